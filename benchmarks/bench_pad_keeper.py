"""Time to first token of an answer that arrives 2 s after a chat starts, while the pad keeper is
still making its first pads, against one that arrives after it finished (SmolLM2 + the demo
adapter, in process, three trials).

    python benchmarks/bench_pad_keeper.py ARTIFACT    # a pads artifact
"""
import statistics, sys, time
from privlora.client.assistant import Assistant, Reply
from privlora.local import local_transport
from privlora.tools.qa import load_qa

art = sys.argv[1]
question = load_qa(split="heldout")[0].question
results = {"busy": [], "idle": []}
for trial in range(3):
    a = Assistant(art, local_transport(art), cache_keys=False, keep_pads=256)
    for state in ("busy", "idle"):
        if state == "busy":
            time.sleep(2.0)  # the keeper is mid-way through its first groups
        else:
            a.wait_for_pads()
        prompt = a.encode(question)
        reply = Reply(prompt_tokens=len(prompt))
        a.client.steps.clear()
        list(a.stream(prompt, a.config(4), reply))
        results[state].append(reply.first_token_s)
        print(trial, state, f"TTFT {reply.first_token_s:.2f} s, pads made on the spot {a.client.steps[0].offline_s:.2f} s", flush=True)
    a.close()
for k, v in results.items():
    print(k, "median TTFT", round(statistics.median(v), 2))
