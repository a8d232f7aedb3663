"""Pads kept ready between answers: made in the background while the user reads or types, never
during an answer, and the answer is the one a cold run gives."""

from __future__ import annotations

from privlora.client.assistant import Assistant, Reply
from privlora.local import local_transport

KEPT = 24


def ready(assistant: Assistant) -> int:
    """The fewest pads any group has ready."""
    return min(assistant.client.pads.ready(g) for groups in assistant.client.groups.values() for g in groups)


def answer(assistant: Assistant, text: str) -> tuple[Reply, list]:
    prompt = assistant.encode(text)
    reply = Reply(prompt_tokens=len(prompt))
    assistant.client.steps.clear()
    list(assistant.stream(prompt, assistant.config(4), reply))
    return reply, list(assistant.client.steps)


def test_pads_are_made_between_answers_and_none_during_one(tiny_build):
    artifact = tiny_build.artifact("pads")
    kept = Assistant(artifact, local_transport(artifact), cache_keys=False, keep_pads=KEPT)
    cold = Assistant(artifact, local_transport(artifact), cache_keys=False)
    try:
        kept.wait_for_pads()  # made while "the user types" the first message
        assert ready(kept) == KEPT
        warm_reply, steps = answer(kept, "hello there")
        assert all(step.offline_s == 0 for step in steps)  # nothing made on the spot, nothing made meanwhile
        cold_reply, cold_steps = answer(cold, "hello there")
        assert cold_steps[0].offline_s > 0 and warm_reply.tokens == cold_reply.tokens
        kept.wait_for_pads()  # topped up again after the answer
        assert ready(kept) == KEPT
        assert kept.client.offline.rows >= KEPT + len(steps)
    finally:
        kept.close()
        cold.close()


def test_a_keeper_stopped_early_leaves_every_group_some_pads(tiny_build):
    """Every group gets the first level before any gets more: stopped right after it, all have it."""
    artifact = tiny_build.artifact("pads")
    assistant = Assistant(artifact, local_transport(artifact), cache_keys=False)
    groups = [g for groups in assistant.client.groups.values() for g in groups]
    asked = []

    def stop() -> bool:  # asked once before each group: yes once the first level is done
        asked.append(1)
        return len(asked) > len(groups)

    try:
        made = assistant.client.prepare(40, stop=stop, first=4)
        assert [assistant.client.pads.ready(g) for g in groups] == [4] * len(groups) and made.rows == 4
    finally:
        assistant.close()
