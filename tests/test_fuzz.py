"""The short, deterministic form of the fuzz suite (issue 11): seeded mutations of every layout
lorascope reads and writes, each case in a forked child with a timeout and a memory limit.

The contract checked: bad input ends in a one-line ``LoraScopeError`` (CLI: exit 2, one
``error:`` line), no NaN/Inf in any result, no hang, no allocation sized by a file's claims, no
code run from a pickle. The long run is ``python -m benchmarks.fuzz`` (see its docstring).

A failing case is named in the assertion; reproduce it with
``python -m benchmarks.fuzz --seed 0 --case INDEX --keep DIR``.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks import fuzz

API_CASES = 250
CLI_CASES = 40
TIMEOUT = 15.0  # seconds per case: a clean case takes well under one; a hang never ends


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    fz = fuzz.Fuzzer(0, workdir=tmp_path_factory.mktemp("fuzz"), timeout=TIMEOUT)
    yield fz
    fz.close()


def _verdict(results: list[fuzz.Result], what: str) -> None:
    bad = [r for r in results if r.bad]
    if bad:
        lines = fuzz.failure_lines(bad)
        warnings.warn(
            f"{what}: {len(bad)} of {len(results)} cases broke the contract:\n" + "\n".join(lines),
            stacklevel=2,
        )
    assert not bad, f"{fuzz.summary(results, [])}\n" + "\n".join(fuzz.failure_lines(bad))


def test_harness_classifies(fuzzer):
    """The harness itself: a clean seed is ok, a payload is refused (never run), a hang is
    killed and reported, a MemoryError and a non-finite result are told apart."""
    assert fuzz.run_forked(lambda: {"outcome": "ok"}, timeout=5, mem_bytes=fuzzer.mem_bytes) == {
        "outcome": "ok"
    }

    def spin() -> dict:
        while True:
            pass

    assert fuzz.run_forked(spin, timeout=0.5, mem_bytes=fuzzer.mem_bytes)["outcome"] == "hang"

    def grab() -> dict:
        blob = bytearray(fuzzer.mem_bytes)
        return {"outcome": "ok", "n": len(blob)}

    assert fuzz.run_forked(grab, timeout=20, mem_bytes=fuzzer.mem_bytes)["outcome"] == "oom"
    assert fuzz.walk_nonfinite({"a": [1.0, {"b": float("nan")}]}) == "a.1.b = nan"
    assert fuzz.walk_nonfinite([np.array([1.0, np.inf])]) == "0 holds NaN/Inf"
    assert fuzz.walk_nonfinite({"a": [1.0, None, "inf", 3]}) is None
    plans = [fuzz.plan(fuzzer.seeds, 0, i)[:2] for i in range(API_CASES)]
    assert plans == [fuzz.plan(fuzzer.seeds, 0, i)[:2] for i in range(API_CASES)]
    covered = {(s.name, c) for s, c in plans}
    assert {s for s, _ in covered} == set(fuzzer.seeds)  # every layout is fuzzed
    assert {c for _, c in covered} == set(fuzz.CLASSES)  # and every mutation class


def test_harness_sees_code_run_and_modes(fuzzer, tmp_path):
    """A payload that runs leaves the canary the harness looks for; an unreadable file stays
    unreadable in a child even when the suite runs as root."""
    canary = tmp_path / fuzz.CANARY
    payload = fuzz._payload("os.system", canary)

    def unpickle() -> dict:
        pickle.loads(payload)  # what lorascope must never do
        return {"outcome": "ok"}

    fuzz.run_forked(unpickle, timeout=10, mem_bytes=fuzzer.mem_bytes)
    assert canary.exists()

    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)

    def read() -> dict:
        try:
            secret.read_text()
        except PermissionError:
            return {"outcome": "lorascope_error"}
        return {"outcome": "ok"}

    drop = os.geteuid() == 0
    rec = fuzz.run_forked(read, timeout=10, mem_bytes=fuzzer.mem_bytes, drop_dac=drop)
    assert rec["outcome"] == "lorascope_error"


def test_mutations_are_reproducible(fuzzer):
    a, b = fuzzer.case(7), fuzzer.case(7)
    assert (a.mutation, a.desc) == (b.mutation, b.desc)


def test_fuzz_api(fuzzer):
    results = fuzzer.run_many(range(API_CASES))
    assert len(results) == API_CASES
    _verdict(results, "fuzz (API)")


def test_fuzz_cli(fuzzer):
    results = fuzzer.run_many(range(CLI_CASES), cli=True)
    _verdict(results, "fuzz (CLI)")
