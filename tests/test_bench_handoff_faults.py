"""``make bench-handoff-faults`` on a small scale: one run of a fault on each side of the
handoff, played by the bench itself on real processes, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.rabbit import Management

ROOT = Path(__file__).resolve().parents[1]
CASES = ("kill-old/after-cutover", "kill-new/self-check")
RUN_FIELDS = {
    "state", "error", "injected", "took_s", "sent", "lost", "duplicated", "rejected",
    "tcp_resets", "tcp_byte_exact", "gateway_rcvbuf_drops", "tool_rcvbuf_drops",
    "max_gap_ms", "serves", "probe", "meets_target",
}  # fmt: skip


def test_one_run_of_a_kill_old_and_a_kill_new_fault_is_counted_and_written(
    rabbit: Management, tmp_path: Path
) -> None:
    """The fault strikes in each run, every count is there and adds up, the kill-old
    case counts what was in flight, and the survivor is the process the fault leaves."""
    results = tmp_path / "handoff_faults.json"
    argv = [
        sys.executable, str(ROOT / "bench" / "handoff_faults.py"),
        "--runs", "1", "--rate", "2000", "--cases", ",".join(CASES), "--results", str(results),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    assert all(name in done.stdout for name in CASES), done.stdout
    result = json.loads(results.read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == set(CASES)
    for case in cases.values():
        assert (case["runs"], case["played"], case["injected"]) == (1, 1, 1), case
        run = case["per_run"][0]
        assert set(run) >= RUN_FIELDS, sorted(RUN_FIELDS - set(run))
        assert run["sent"] > 0 and 0 <= run["lost"] <= run["sent"], run
        assert case["lost"] == run["lost"] and case["tcp_resets"] == run["tcp_resets"]
        assert run["probe"] == "ok", run
    old, new = cases["kill-old/after-cutover"], cases["kill-new/self-check"]
    assert old["states"] == {"SUCCEEDED": 1} and old["serves"] == ["new"], old
    assert 0 <= old["in_flight_udp"] <= old["lost"], old
    assert new["states"] == {"ROLLED_BACK": 1} and new["serves"] == ["old"], new
    assert "in_flight_udp" not in new
