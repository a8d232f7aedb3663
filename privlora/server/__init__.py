"""The adapter owner's machine: it holds the private LoRA weights (the server bundle) and never
sees a prompt. ``hosting`` is the one entry point every transport goes through (authentication,
artifact routing); ``private`` evaluates one artifact's rounds under its sessions' rules
(``sessions``) and the accounts' budgets (``accounts``); ``http`` and ``ray`` are the front-ends.
It never imports ``privlora.client``: it rests on ``core`` and ``backends`` only."""
