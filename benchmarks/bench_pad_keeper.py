"""Time to first token of an answer that arrives 2 s after a chat starts, while the pad keeper is
still making its first pads, against one that arrives after it finished (SmolLM2 + the demo
adapter, in process, three trials).

    python benchmarks/bench_pad_keeper.py ARTIFACT    # a pads artifact
"""

from __future__ import annotations

import statistics
import sys
import time

from privlora.client.assistant import Assistant, Reply
from privlora.local import local_transport
from privlora.tools.machine import report_machine
from privlora.tools.qa import load_qa


def main() -> None:
    report_machine()
    artifact = sys.argv[1]
    question = load_qa(split="heldout")[0].question
    results: dict[str, list[float]] = {"busy": [], "idle": []}
    for trial in range(3):
        assistant = Assistant(artifact, local_transport(artifact), cache_keys=False, keep_pads=256)
        for state in ("busy", "idle"):
            if state == "busy":
                time.sleep(2.0)  # the keeper is mid-way through its first groups
            else:
                assistant.wait_for_pads()
            prompt = assistant.encode(question)
            reply = Reply(prompt_tokens=len(prompt))
            assistant.client.steps.clear()
            list(assistant.stream(prompt, assistant.config(4), reply))
            results[state].append(reply.first_token_s)
            print(trial, state, f"TTFT {reply.first_token_s:.2f} s, pads made on the spot "
                  f"{assistant.client.steps[0].offline_s:.2f} s", flush=True)
        assistant.close()
    for state, seconds in results.items():
        print(state, "median TTFT", round(statistics.median(seconds), 2))


if __name__ == "__main__":
    main()
