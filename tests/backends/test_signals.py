"""Two ways concrete took over the process, both fixed in the backend. The root cause of the native
crash seen in CI: concrete's compiler and runtime replace the
process's signal handlers (SIGPIPE among them), so that after a circuit ran, writing to a
connection the peer had closed aborted the process, and the abort handler's own recursion ended
in SIGSEGV. The backend keeps the process's handlers; the control runs a circuit without that
care and dies on the same write. And its exit hook, which turned every exit status into 0."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from privlora.backends.signals import handlers

WRITE_TO_A_CLOSED_PEER = """
import socket
ours, theirs = socket.socketpair()
theirs.close()
try:
    for _ in range(4):
        ours.send(b"x" * 65536)
except OSError as exc:
    print("survived:", type(exc).__name__)
"""


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script) + WRITE_TO_A_CLOSED_PEER],
                          capture_output=True, text=True, timeout=600)


def test_a_process_that_ran_the_concrete_backend_survives_a_write_to_a_closed_connection(tiny_build):
    artifact = tiny_build.artifact("concrete")
    secure = run(f"""
        from privlora.backends.signals import handlers
        from privlora.local import open_local
        from privlora.client.generation import GenerationConfig, generate
        before = handlers()
        client = open_local({str(artifact)!r})
        print("tokens:", list(generate(client, [3, 4, 5], GenerationConfig(max_new_tokens=2))))
        assert handlers() == before, (before, handlers())
    """)
    assert secure.returncode == 0 and "survived: BrokenPipeError" in secure.stdout, secure.stderr[-2000:]
    # Control: a circuit run without keeping the handlers leaves the runtime's, and the same write kills.
    bare = run("""
        from concrete import fhe
        @fhe.compiler({"x": "encrypted"})
        def add_one(x):
            return x + 1
        print(add_one.compile(range(8)).encrypt_run_decrypt(3))
    """)
    assert bare.returncode < 0 and "survived" not in bare.stdout, (bare.returncode, bare.stdout)


def test_this_process_keeps_its_handlers_too():
    """The test process itself ran the concrete backend's compile and evaluation in other tests;
    Python's SIGPIPE disposition (ignored) is still in place."""
    import signal

    assert handlers()[signal.SIGPIPE] == int(signal.SIG_IGN)


def exit_status(script: str) -> int:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=600).returncode


def test_a_process_that_ran_the_concrete_backend_ends_with_its_own_exit_status(tiny_build):
    """concrete registers an atexit callback that ends the process with exit(0) once a circuit has
    run: a failing `privlora` command, or a pytest run with failures (CI), reported success. The
    backend removes it; the control, a bare circuit, still exits 0 after sys.exit(3)."""
    artifact = tiny_build.artifact("concrete")
    assert exit_status(f"""
        import sys
        from privlora.local import open_local
        from privlora.client.generation import GenerationConfig, generate
        print(list(generate(open_local({str(artifact)!r}), [3, 4, 5], GenerationConfig(max_new_tokens=2))))
        sys.exit(3)
    """) == 3
    assert exit_status("""
        import sys
        from concrete import fhe
        @fhe.compiler({"x": "encrypted"})
        def add_one(x):
            return x + 1
        print(add_one.compile(range(8)).encrypt_run_decrypt(3))
        sys.exit(3)
    """) == 0
