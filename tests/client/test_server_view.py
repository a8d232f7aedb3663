"""What the server received for one group of an answer's last token, beside the client's x: the
picture the chat page draws is read from the message that really left. With pads the values are
x plus a one-time pad, unrelated to x; the control, ``plain``, sends x in clear and the picture
shows it."""

from __future__ import annotations

import numpy as np

from privlora.client.assistant import Assistant, Reply
from privlora.local import local_transport

TOKENS = 4


def view_of(artifact, prompt: str = "hello there") -> dict:
    assistant = Assistant(artifact, local_transport(artifact))
    tokens = assistant.encode(prompt)
    reply = Reply(prompt_tokens=len(tokens))
    list(assistant.stream(tokens, assistant.config(TOKENS), reply))
    assistant.close()
    return reply.server_view


def correlation(view: dict) -> float:
    return float(np.corrcoef(view["received"]["strip"], view["activation"]["strip"])[0, 1])


def test_pads_send_x_plus_a_pad_that_hides_it(tiny_build):
    view = view_of(tiny_build.artifact("pads"))
    received = view["received"]
    assert "one-time pad" in received["meaning"] and received["low"] == 0 and received["high"] > 2 ** 30
    assert view["rows"] == 1 and received["count"] == view["activation"]["count"]  # one token, d_in values
    assert abs(correlation(view)) < 0.5  # 64 values: |r| of unrelated ones is about 0.13
    assert max(received["histogram"]) < 0.25  # spread over the modulus, not where x is


def test_control_a_backend_without_protection_shows_x(tiny_build):
    view = view_of(tiny_build.artifact("plain"))
    assert "in clear" in view["received"]["meaning"]
    assert correlation(view) > 0.99  # the server read x itself


def test_every_answer_has_its_own_picture(tiny_build):
    artifact = tiny_build.artifact("pads")
    first, second = view_of(artifact, "hello there"), view_of(artifact, "something else entirely")
    assert first["activation"]["strip"] != second["activation"]["strip"]
    assert first["received"]["strip"] != second["received"]["strip"]
