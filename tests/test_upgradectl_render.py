"""The shapes people see, from plain data."""

from __future__ import annotations

import dataclasses
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from upgradectl import render
from upgradectl.model import (
    AuditEvent,
    CreatedToken,
    GatewayInfo,
    GatewayProgress,
    JobEvent,
    JobView,
    KeyDirectory,
    PlannedGateway,
    ReleaseInfo,
    RoleKey,
    Rotation,
    TargetsChange,
    TokenInfo,
    UpgradePlan,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def _job(state: str = "RUNNING", gw2: str = "QUEUED") -> JobView:
    return JobView(
        job_id="j-1",
        state=state,
        target_version="1.2.0",
        gateways=(
            GatewayProgress("gw-1", "DOWNLOADING", "1.1.0", "1.2.0", "", 512, 2048),
            GatewayProgress("gw-22", gw2, "1.1.0", "1.2.0"),
        ),
    )


def test_table_aligns_columns_without_trailing_space() -> None:
    lines = render.table(["ID", "STATE"], [["gw-1", "ONLINE"], ["gateway-22", ""]])
    assert lines == ["ID          STATE", "gw-1        ONLINE", "gateway-22"]


def test_human_sizes() -> None:
    assert render.human_size(0) == "0 B"
    assert render.human_size(1023) == "1023 B"
    assert render.human_size(1536) == "1.5 KiB"
    assert render.human_size(5 * 1024 * 1024) == "5.0 MiB"
    assert render.human_size(3 * 1024**4) == "3.0 TiB"


def test_relative_times() -> None:
    assert render.ago(None, NOW) == "never"
    assert render.ago(NOW - timedelta(seconds=12), NOW) == "12s ago"
    assert render.ago(NOW - timedelta(minutes=5, seconds=3), NOW) == "5m ago"
    assert render.ago(NOW - timedelta(hours=3), NOW) == "3h ago"
    assert render.ago(NOW - timedelta(days=2, hours=1), NOW) == "2d ago"
    assert render.ago(NOW + timedelta(seconds=2), NOW) == "just now"


def test_gateways_and_releases_tables() -> None:
    gws = [GatewayInfo("gw-1", "1.1.0", "ONLINE", NOW - timedelta(seconds=4), 3)]
    assert render.gateways_table(gws, NOW) == [
        "ID    VERSION  STATE   VPN USERS  LAST SEEN",
        "gw-1  1.1.0    ONLINE  3          4s ago",
    ]
    assert render.gateways_table([], NOW) == ["no gateways known to the controller yet"]
    notes = "Restarts the VPN service. " + "x" * 80 + "\nsecond line"
    rels = [
        ReleaseInfo(
            "1.2.0", "ab" * 32, 3 * 1024 * 1024, NOW, notes, signing="SIGNED", min_from="1.1.0"
        ),
        ReleaseInfo("1.1.0", "cd" * 32, 900, NOW, "", signing="YANKED"),
        ReleaseInfo("1.0.0", "ef" * 32, 900, NOW, "", signing=""),
    ]
    header, row, yanked, unknown = render.releases_table(rels)
    assert header.split() == [
        "VERSION", "SIZE", "PUBLISHED", "SHA256", "SIGNING", "VPN", "FROM", "NOTES",
    ]  # fmt: skip
    assert row.startswith(
        "1.2.0    3.0 MiB  2025-03-01 12:00 UTC  abababababab  SIGNED   -    1.1.0  Restarts the"
    )
    assert row.endswith("…") and len(row.split("  ")[-1]) == render.NOTES_WIDTH
    assert yanked == "1.1.0    900 B    2025-03-01 12:00 UTC  cdcdcdcdcdcd  YANKED   -    any"
    # A controller that does not say how a release is signed.
    assert unknown == "1.0.0    900 B    2025-03-01 12:00 UTC  efefefefefef  -        -    any"


def test_a_path_through_releases_between_shows_in_the_plan_and_the_job() -> None:
    release = ReleaseInfo("2.0.0", "ab" * 32, 900, NOW, "", min_from="1.2.0")
    plan = UpgradePlan(
        release,
        (
            PlannedGateway("gw-old", "1.0.0", "UPGRADE", 0, path=("1.2.0", "2.0.0")),
            PlannedGateway("gw-new", "1.2.0", "UPGRADE", 0),
            PlannedGateway("gw-stuck", "0.9.0", "UPGRADE", 0, blocked="no upgrade path for …"),
        ),
        0,
    )
    lines = render.plan_lines(plan)
    rows = [line.split() for line in lines[-6:-3]]
    assert rows == [
        ["gw-old", "1.0.0", "2.0.0", "via", "1.2.0", "UPGRADE"],
        ["gw-new", "1.2.0", "2.0.0", "UPGRADE"],
        ["gw-stuck", "0.9.0", "-", "(no", "upgrade", "path:", "left", "out)", "UPGRADE"],
    ]
    assert lines[-2:] == ["left out:", "  gw-stuck: no upgrade path for …"]
    path = ("1.1.0", "1.2.0", "2.0.0")
    midway = GatewayProgress("gw-old", "DOWNLOADING", "1.1.0", "1.2.0", path=path, hop=2)
    last = dataclasses.replace(midway, from_version="1.2.0", to_version="2.0.0", hop=3)
    job = JobView("j-1", "RUNNING", "2.0.0", (midway, last))
    assert "1.2.0 (hop 2 of 3, then 2.0.0)" in render.job_lines(job)[-2]
    assert "2.0.0 (hop 3 of 3)" in render.job_lines(job)[-1]


def test_a_soaking_gateway_shows_its_health_where_a_failure_shows_its_reason() -> None:
    soaking = GatewayProgress("gw-1", "SOAKING", "1.1.0", "1.2.0", health="2/2 tunnels up")
    back = GatewayProgress(
        "gw-2", "ROLLED_BACK", "1.1.0", "1.2.0", "soak: tunnel 1 went down", health="1/2"
    )
    lines = render.job_lines(JobView("j-1", "RUNNING", "1.2.0", (soaking, back)))
    assert lines[-2].split() == [
        "gw-1",
        "SOAKING",
        "1.1.0",
        "1.2.0",
        "soak:",
        "2/2",
        "tunnels",
        "up",
    ]
    assert lines[-1].endswith("soak: tunnel 1 went down")


def test_job_lines_show_progress_and_errors() -> None:
    job = _job(gw2="FAILED")
    failed = GatewayProgress("gw-22", "FAILED", "1.1.0", "1.2.0", "disk full")
    job = JobView(job.job_id, job.state, job.target_version, (job.gateways[0], failed))
    lines = render.job_lines(job)
    assert lines[0] == "job j-1  target 1.2.0  RUNNING  (0/2 gateways succeeded)"
    assert lines[1].split() == ["GATEWAY", "STATE", "FROM", "TO", "PROGRESS", "ERROR"]
    assert lines[2].split() == ["gw-1", "DOWNLOADING", "1.1.0", "1.2.0", "25%"]
    assert lines[3].split()[:4] == ["gw-22", "FAILED", "1.1.0", "1.2.0"]
    assert lines[3].endswith("disk full")


def test_event_lines() -> None:
    at = NOW + timedelta(seconds=7)
    dl = JobEvent(3, at, "gw-1", "DOWNLOADING", "", "", 1024 * 1024, 4 * 1024 * 1024)
    assert render.event_line(dl) == "12:00:07  gw-1  DOWNLOADING  25% of 4.0 MiB"
    failed = JobEvent(4, at, "gw-2", "ROLLED_BACK", "", "missed its deadline")
    assert render.event_line(failed) == "12:00:07  gw-2  ROLLED_BACK  missed its deadline"
    done = JobEvent(5, at, "", "", "PARTIAL")
    assert render.event_line(done) == "12:00:07  job PARTIAL"


def test_apply_event_moves_one_gateway_and_the_job() -> None:
    job = _job()
    job = job.apply(JobEvent(1, NOW, "gw-22", "DOWNLOADING", "", "", 10, 100))
    assert [g.state for g in job.gateways] == ["DOWNLOADING", "DOWNLOADING"]
    assert render.progress(job.gateways[1]) == "10%"
    job = job.apply(JobEvent(2, NOW, "", "", "FAILED"))
    assert job.state == "FAILED" and job.finished and not job.succeeded


def test_live_display_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    display = render.LiveDisplay(out, tty=True)
    job = _job()
    display.start(job)
    first = out.getvalue()
    assert first == "\x1b[J" + "".join(f"{line}\n" for line in render.job_lines(job))
    job = job.apply(JobEvent(1, NOW, "gw-22", "SWAPPING", ""))
    display.update(job, JobEvent(1, NOW, "gw-22", "SWAPPING", ""))
    second = out.getvalue()[len(first) :]
    # Up over the four lines drawn before, clear, draw again.
    assert second.startswith("\x1b[4F\x1b[J")
    assert ["gw-22", "SWAPPING", "1.1.0", "1.2.0"] in [line.split() for line in second.splitlines()]


def test_live_display_writes_one_line_per_event_elsewhere() -> None:
    out = io.StringIO()
    display = render.LiveDisplay(out, tty=False)
    job = _job()
    display.start(job)
    for seq, state in enumerate(["DOWNLOADING", "VERIFYING"], start=1):
        event = JobEvent(seq, NOW, "gw-22", state, "")
        job = job.apply(event)
        display.update(job, event)
    lines = out.getvalue().splitlines()
    assert lines == [
        "watching job j-1 (target 1.2.0, RUNNING)",
        "12:00:00  gw-22  DOWNLOADING",
        "12:00:00  gw-22  VERIFYING",
    ]
    assert "\x1b" not in out.getvalue()


# --- Text from outside is shown, never obeyed -----------------------------------------------

# Every character a terminal (or a bidi-aware one) acts on instead of printing: C0 and C1
# controls with ESC and DEL, bidi marks, embeddings, overrides and isolates, zero-width
# characters, the byte-order mark, line and paragraph separators.
ACTIVE = (
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + list("\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e")
    + list("\u2066\u2067\u2068\u2069\ufeff\u2028\u2029")
)
HOSTILE = "\x1b[2J\x1b[8mhidden\x9b31m\u202egnp.exe\x07\r\x7f\u2066x\u2069\u2028end"


def _harmless(text: str, *, newlines: bool = False) -> bool:
    return all(ch not in ACTIVE or (newlines and ch == "\n") for ch in text)


def test_printable_escapes_every_active_character() -> None:
    for ch in ACTIVE:
        shown = render.printable(f"a{ch}b")
        assert _harmless(shown), f"{ch!r} came out as {shown!r}"
        assert shown.startswith("a\\") and shown.endswith("b"), shown
    assert render.printable(HOSTILE) == (
        "\\x1b[2J\\x1b[8mhidden\\x9b31m\\u202egnp.exe\\x07\\r\\x7f\\u2066x\\u2069\\u2028end"
    )
    assert render.printable("a\tb\nc") == "a\\tb\\nc"


def test_printable_keeps_ordinary_text_and_is_stable() -> None:
    plain = "Schnellere Schlüssel, 日本語, émoji 🚀, a\u00a0non-breaking space, C:\\path"
    assert render.printable(plain) == plain
    twice = render.printable(render.printable(HOSTILE))
    assert twice == render.printable(HOSTILE)
    assert render.printable("one\ntwo\x1b[2J", keep_newlines=True) == "one\ntwo\\x1b[2J"


def test_tables_escape_cells_and_stay_aligned() -> None:
    lines = render.table(["ID", "STATE"], [["gw-\x1b[2J", "ONLINE"], ["gw-1\n", "x"]])
    assert lines == ["ID          STATE", "gw-\\x1b[2J  ONLINE", "gw-1\\n      x"]
    gws = [GatewayInfo(HOSTILE, HOSTILE, HOSTILE, None, 0)]
    rels = [ReleaseInfo(HOSTILE, HOSTILE, 1, None, HOSTILE + "\nsecond line")]
    for line in render.gateways_table(gws, NOW) + render.releases_table(rels):
        assert _harmless(line), line


def test_first_line_cuts_after_escaping() -> None:
    notes = "\x1b[2J" * 20
    line = render.first_line(notes)
    assert _harmless(line)
    assert len(line) == render.NOTES_WIDTH and line.startswith("\\x1b[2J\\x1b[2J")


def test_live_display_escapes_what_it_draws() -> None:
    bad = GatewayProgress(HOSTILE, "FAILED", HOSTILE, HOSTILE, HOSTILE)
    job = JobView(HOSTILE, "RUNNING", HOSTILE, (bad,))
    event = JobEvent(1, NOW, HOSTILE, "ROLLED_BACK", "", HOSTILE)
    for tty in (True, False):
        out = io.StringIO()
        display = render.LiveDisplay(out, tty=tty)
        display.start(job)
        display.update(job, event)
        display.finish(job)
        # On a terminal the display's own cursor moves are the only controls written.
        written = re.sub(r"\x1b\[(\d+F\x1b\[)?J", "", out.getvalue())
        assert _harmless(written, newlines=True), written
        assert "\\x1b[2J\\x1b[8mhidden" in written


def test_built_lines_say_the_artifact_is_not_signed_yet() -> None:
    assert render.built_lines("1.4.0", "out/h.pyz", 2048, "ab" * 32) == [
        f"built out/h.pyz: release 1.4.0, 2.0 KiB, sha256 {'ab' * 32}",
        "not signed yet: gateways and the controller take it only once the targets key lists "
        "it; sign and upload it with:",
        "  upgradectl releases publish --version 1.4.0 --artifact out/h.pyz --keys DIR",
    ]


def test_published_lines_name_the_targets_version_that_signs_it() -> None:
    release = ReleaseInfo("1.4.0", "ab" * 32, 2048, NOW, "", signing="SIGNED")
    change = TargetsChange(b"{}", 7, 6, "hitless-1.4.0.pyz", 2048, "ab" * 32)
    assert render.published_lines(release, change) == [
        f"published 1.4.0: 2.0 KiB, sha256 {'ab' * 32}",
        "signing: SIGNED (targets version 7 lists hitless-1.4.0.pyz)",
    ]
    assert render.published_lines(release, None) == [
        f"published 1.4.0: 2.0 KiB, sha256 {'ab' * 32}"
    ]


def test_keys_init_lines_list_each_key_and_where_each_part_goes() -> None:
    k = Path("/srv/keys")
    made = KeyDirectory(
        dir=k,
        root_json=k / "root.json",
        root_version=1,
        expires=NOW,
        offline=k / "offline",
        online=k / "online",
        keys=(
            RoleKey("root", "aa" * 32, k / "offline/root.pem"),
            RoleKey("timestamp", "bb" * 32, k / "online/timestamp.pem"),
        ),
    )
    assert render.keys_init_lines(made) == [
        "made the key directory /srv/keys: root version 1, expires 2025-03-01 12:00 UTC",
        "",
        "ROLE       KEY ID" + " " * 60 + "FILE",
        f"root       {'aa' * 32}  /srv/keys/offline/root.pem",
        f"timestamp  {'bb' * 32}  /srv/keys/online/timestamp.pem",
        "",
        "where each part goes:",
        "  /srv/keys/root.json",
        "      the trust anchor: give it to the controller (controller-svc serve --trust-root "
        "FILE)",
        "      gateways get it from the controller when they enroll (gateway-daemon enroll, "
        "with a code from upgradectl gateways enroll)",
        "  /srv/keys/offline/  (root and targets keys)",
        "      stay with the release manager, never on the controller or a gateway; keep a "
        "backup offline",
        "      they sign releases and key rotations: releases publish/yank --keys /srv/keys, "
        "keys rotate --dir /srv/keys",
        "  /srv/keys/online/  (snapshot, timestamp and command keys)",
        "      go to the controller: controller-svc serve --online-keys DIR (default: online/ "
        "beside its --trust-root)",
    ]


def test_yank_and_rotation_lines() -> None:
    change = TargetsChange(b"{}", 5, 4, "hitless-1.2.0.pyz", 3 * 1024 * 1024, "cd" * 32)
    assert render.yank_lines("1.2.0", change) == [
        f"release 1.2.0: targets version 4 lists hitless-1.2.0.pyz (3.0 MiB, sha256 {'cd' * 32})",
        "yanking publishes targets version 5 without it: from then on the controller and every "
        "gateway refuse to install it",
    ]
    yanked = ReleaseInfo("1.2.0", "cd" * 32, 1, NOW, "", signing="YANKED")
    assert render.yanked_lines(yanked, change) == [
        "yanked 1.2.0: targets version 5 no longer lists hitless-1.2.0.pyz (signing: YANKED)"
    ]
    lines = render.rotation_lines(Rotation(3, ("targets", "command"), 9), "/k")
    assert lines[:2] == [
        "the controller trusts root version 3: new targets, command key(s) (the replaced ones "
        "are in /k/retired/)",
        "it took targets version 9 with it, re-signed with the new targets key",
    ]
    assert len(render.rotation_lines(Rotation(3, ("command",), None), "/k")) == 2


# --- API tokens and the audit log ------------------------------------------------------------


TOKEN = TokenInfo("ci", "operator", NOW - timedelta(days=1), None, None, "token:root")


def _token(name: str, **changes: Any) -> TokenInfo:
    return dataclasses.replace(TOKEN, name=name, **changes)


def test_tokens_table_marks_expired_and_revoked() -> None:
    tokens = [
        _token("ci", expires_at=NOW + timedelta(days=89)),
        _token("old", role="viewer", expires_at=NOW - timedelta(seconds=1)),
        _token("gone", role="admin", revoked_at=NOW, created_by=""),
    ]
    assert render.tokens_table(tokens, NOW) == [
        "NAME  ROLE      CREATED               EXPIRES                         REVOKED"
        "               BY",
        "ci    operator  2025-02-28 12:00 UTC  2025-05-29 12:00 UTC            -"
        "                     token:root",
        "old   viewer    2025-02-28 12:00 UTC  2025-03-01 11:59 UTC (expired)  -"
        "                     token:root",
        "gone  admin     2025-02-28 12:00 UTC  never                           2025-03-01 12:00 UTC"
        "  -",
    ]
    assert render.tokens_table([], NOW) == [
        "no API tokens yet (upgradectl tokens create --role ROLE --name NAME)"
    ]


def test_tokens_table_escapes_hostile_names_and_stays_aligned() -> None:
    tokens = [
        _token(HOSTILE, role=HOSTILE, created_by=HOSTILE + "\nforged row"),
        _token("ci", role="admin", created_by="token:root"),
    ]
    header, hostile, plain = render.tokens_table(tokens, NOW)
    for line in (header, hostile, plain):
        assert _harmless(line), line
    assert hostile.startswith("\\x1b[2J\\x1b[8mhidden")
    assert hostile.endswith("\\u2028end\\nforged row")  # one row, newline shown
    assert plain.index("admin") == header.index("ROLE")
    assert plain.index("token:root") == header.index("BY")


def test_audit_table_escapes_every_field_and_keeps_one_row_per_event() -> None:
    events = [
        AuditEvent(2, NOW + timedelta(seconds=7), HOSTILE, HOSTILE, HOSTILE,
                   "version=1.2.0\r\nOK", HOSTILE),
        AuditEvent(1, NOW, "token:ci", "", "CreateToken", "", "OK"),
    ]  # fmt: skip
    header, hostile, plain = render.audit_table(events)
    assert header.split() == ["SEQ", "AT", "ACTOR", "PEER", "ACTION", "DETAIL", "OUTCOME"]
    for line in (header, hostile, plain):
        assert _harmless(line), line
    assert hostile.startswith("2    2025-03-01 12:00:07 UTC  \\x1b[2J\\x1b[8mhidden")
    assert "version=1.2.0\\r\\nOK" in hostile
    assert plain.index("token:ci") == header.index("ACTOR")
    assert plain.index("CreateToken") == header.index("ACTION")
    assert plain.index("OK") == header.index("OUTCOME")
    assert plain.split() == ["1", "2025-03-01", "12:00:00", "UTC", "token:ci", "-",
                             "CreateToken", "-", "OK"]  # fmt: skip
    assert render.audit_table([]) == ["no audit events"]
    assert render.audit_table([], NOW) == ["no audit events since 2025-03-01 12:00:00 UTC"]


def test_created_token_lines_show_the_secret_once_and_how_to_use_it() -> None:
    created = CreatedToken(_token("ci", expires_at=NOW + timedelta(days=90)), "hlt_s3cret")
    lines = render.created_token_lines(created)
    assert lines[:4] == [
        "created token ci: role operator, expires 2025-05-30 12:00 UTC",
        "",
        "    hlt_s3cret",
        "",
    ]
    assert lines[4:] == render.secret_warning()
    assert sum(line.count("hlt_s3cret") for line in lines) == 1
    assert "hlt_s3cret" not in repr(created)
    never = render.created_token_lines(CreatedToken(_token("ci"), "x"))
    assert never[0] == "created token ci: role operator, never expires"


def test_revoked_token_lines() -> None:
    assert render.revoked_token_lines(_token("ci", revoked_at=NOW)) == [
        "revoked token ci (role operator) at 2025-03-01 12:00 UTC: the controller refuses it "
        "from now on"
    ]


def test_the_plan_warns_of_offline_gateways_and_says_the_controller_moves_first() -> None:
    release = ReleaseInfo("1.2.0", "ab" * 32, 900, NOW, "")
    plan = UpgradePlan(
        release,
        (
            PlannedGateway("gw-1", "1.1.0", "UPGRADE", 0, state="ONLINE"),
            PlannedGateway("gw-2", "1.1.0", "UPGRADE", 0, state="OFFLINE"),
            PlannedGateway("gw-3", "1.2.0", "NOTHING", 0, state="OFFLINE"),
        ),
        0,
        controller_from="1.1.0",
    )
    text = "\n".join(render.plan_lines(plan))
    assert "offline now: gw-2: a command waits for its gateway until the job's deadline" in text
    assert "gw-3:" not in text  # it changes nothing
    assert "the controller upgrades itself from 1.1.0 to 1.2.0 first" in text
    quiet = dataclasses.replace(plan, gateways=plan.gateways[:1], controller_from="")
    assert "offline" not in "\n".join(render.plan_lines(quiet))
    assert "upgrades itself" not in "\n".join(render.plan_lines(quiet))
