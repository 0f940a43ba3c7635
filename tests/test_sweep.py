"""The registry sweep on NDJSON input: same results as `cds evaluate`, outputs, funnel, report,
resume after an interrupt, and the pieces it is built from (no FHIR server needed)."""

from __future__ import annotations

import csv
import io
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import cds.sweep.ndjson as ndjson_module
import cds.sweep.runner as runner_module
import cds.sweep.store as store_module
from cds.cli import main
from cds.criteria import load_trials
from cds.errors import FhirError, InputError
from cds.evaluate_command import evaluate_files
from cds.fhir.bulk import RateLimiter, export_supported
from cds.fhir.bundle import bundle_resources
from cds.fhir.client import FhirClient, RetryPolicy, Timeouts
from cds.sweep.core import result_line
from cds.sweep.progress import Progress
from cds.sweep.remote import RestOptions, sweep_rest
from cds.sweep.runner import sweep_ndjson
from cds.sweep.writeback import identifier_searchable
from cds.synthetic import Population, write_population
from tests.helpers import AS_OF, printed_lines, sweep_lines, sweep_options

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHEA = REPO_ROOT.parent / "shared" / "data" / "synthea-r4"


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("population")
    pop = Population(90, seed=11, net_every=2)
    write_population(pop, root / "ndjson", "ndjson")
    write_population(pop, root / "bundles", "bundles")
    return {"ndjson": root / "ndjson", "bundles": root / "bundles"}


@pytest.fixture(scope="module")
def expected(population: dict[str, Path]) -> list[str]:
    """`cds evaluate` of the same population as bundles: the lines a sweep must reproduce."""
    return printed_lines(evaluate_files([str(population["bundles"])], load_trials(), AS_OF))


def test_result_line_is_exactly_what_cds_evaluate_prints() -> None:
    """The hand-written encoder against json.dumps over every fixture (non-ASCII text, empty
    and long evidence lists, every result and status)."""
    evaluations = evaluate_files([str(REPO_ROOT / "fhir_fixtures")], load_trials(), AS_OF)
    assert len(evaluations) >= 40
    statuses = set()
    for evaluation in evaluations:
        printed = json.dumps(evaluation.to_json(), ensure_ascii=False) + "\n"
        assert result_line(evaluation) == printed.encode()
        statuses.update(t.status for t in evaluation.trials)
    assert len(statuses) == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_ndjson_sweep_equals_cds_evaluate(
    population: dict[str, Path],
    expected: list[str],
    tmp_path: Path,
    workers: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ndjson_module, "BUCKET_BYTES", 1 << 20)  # several partitions
    summary = sweep_ndjson(population["ndjson"], sweep_options(tmp_path, workers=workers))
    assert summary["complete"] and summary["partitions"]["total"] > 2
    assert sweep_lines(tmp_path) == expected
    assert summary["patients"] == 90 and summary["errors"] == 0


def test_outputs_summary_funnel_and_report(population: dict[str, Path], tmp_path: Path) -> None:
    summary = sweep_ndjson(population["ndjson"], sweep_options(tmp_path))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"results.ndjson", "candidates.csv", "summary.json", "report.html"} <= files
    assert not [p for p in tmp_path.rglob("*.tmp")]
    # The as-of date is one value, written into every output.
    assert json.loads((tmp_path / "summary.json").read_text())["as_of"] == "2026-11-01"
    for line in (tmp_path / "results.ndjson").read_text().splitlines():
        assert json.loads(line)["as_of"] == "2026-11-01"
    assert "2026-11-01" in (tmp_path / "report.html").read_text()

    results = [json.loads(line) for line in (tmp_path / "results.ndjson").read_text().splitlines()]
    with open(tmp_path / "candidates.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    wanted = {
        (r["patient"], t["trial"], t["status"])
        for r in results
        for t in r["trials"]
        if t["status"] in ("candidate", "needs-review")
    }
    assert {(r["patient"], r["trial"], r["status"]) for r in rows} == wanted
    review = next(r for r in rows if r["status"] == "needs-review")
    assert int(review["unknown_count"]) >= 1 and review["unknown"]
    assert all(int(r["unknown_count"]) == 0 for r in rows if r["status"] == "candidate")

    for tid, trial in summary["trials"].items():
        assert sum(trial["status"].values()) == 90
        funnel = trial["funnel"]
        assert funnel[0]["entering"] == 90
        for before, after in zip(funnel, funnel[1:], strict=False):
            assert after["entering"] == before["remaining"]  # only a fail removes a patient
        for c in funnel:
            assert c["pass"] + c["fail"] + c["unknown"] + c["manual"] == c["entering"]
            assert sum(c["all_patients"].values()) == 90
        # Unknown is counted apart from fail.
        assert sum(c["unknown"] for c in funnel) > 0
        candidates = trial["status"]["candidate"] + trial["status"]["needs-review"]
        assert funnel[-1]["remaining"] == candidates, tid
        # Protocol order, from the trial definition.
        assert [c["id"] for c in funnel] == [c.id for c in load_trials()[tid].criteria]

    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2 and "<script" not in page
    assert "src=" not in page and "<link" not in page  # self-contained


def test_resume_after_interrupt_gives_the_same_totals(
    population: dict[str, Path],
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ndjson_module, "BUCKET_BYTES", 1 << 20)
    # The one-worker path evaluates each partition here and commits it in the background.
    real = runner_module.evaluate_partition
    calls = {"n": 0}

    def interrupted(task: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(runner_module, "evaluate_partition", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_ndjson(population["ndjson"], sweep_options(tmp_path, workers=1))
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert partial["complete"] is False
    assert 0 < partial["patients"] < 90
    assert len(sweep_lines(tmp_path)) == partial["patients"]  # what is done is written
    assert "INCOMPLETE" in (tmp_path / "report.html").read_text().upper()
    # An interrupted sweep's outputs are copies: editing them cannot touch the checkpoint.
    assert (tmp_path / "results.ndjson").stat().st_nlink == 1
    (tmp_path / "results.ndjson").write_text("")

    monkeypatch.setattr(runner_module, "evaluate_partition", real)
    with pytest.raises(InputError, match="as of"):
        sweep_ndjson(
            population["ndjson"], sweep_options(tmp_path, resume=True, as_of=AS_OF.replace(day=2))
        )
    summary = sweep_ndjson(population["ndjson"], sweep_options(tmp_path, resume=True, as_of=None))
    assert summary["complete"] and summary["patients"] == 90
    assert summary["as_of"] == "2026-11-01"
    assert sweep_lines(tmp_path) == expected  # none lost, none twice
    fresh = sweep_ndjson(population["ndjson"], sweep_options(tmp_path / "fresh"))
    assert fresh["trials"] == summary["trials"]


def test_resume_of_a_complete_sweep_assembles_lost_outputs_again(
    population: dict[str, Path], expected: list[str], tmp_path: Path
) -> None:
    """A one-worker sweep run in one go gives its results segment the name results.ndjson (a
    hard link: no copy); the other outputs are copies, not fsynced. If a crash loses them,
    --resume rebuilds them from the checkpoint, evaluating nobody again."""
    first = sweep_ndjson(population["ndjson"], sweep_options(tmp_path, workers=1))
    assert (tmp_path / "results.ndjson").stat().st_nlink == 2  # one copy on disk
    (tmp_path / "results.ndjson").unlink()
    (tmp_path / "candidates.csv").unlink()
    again = sweep_ndjson(population["ndjson"], sweep_options(tmp_path, resume=True))
    assert again["complete"] and again["patients"] == first["patients"] == 90
    assert sweep_lines(tmp_path) == expected
    assert (tmp_path / "candidates.csv").read_text().startswith("patient,trial,status")


def test_resume_after_results_were_cut_short_in_place_says_so(
    population: dict[str, Path], tmp_path: Path
) -> None:
    """Cutting the linked results file short in place cuts the checkpoint's copy too:
    reassembling from it is refused with a message, never a shorter results file."""
    sweep_ndjson(population["ndjson"], sweep_options(tmp_path, workers=1))
    with open(tmp_path / "results.ndjson", "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match="sweep again without --resume"):
        sweep_ndjson(population["ndjson"], sweep_options(tmp_path, resume=True))


def test_a_checkpoint_of_another_format_is_not_resumed(
    population: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_ndjson(population["ndjson"], sweep_options(tmp_path, workers=1))
    monkeypatch.setattr(store_module, "STATE_VERSION", store_module.STATE_VERSION + 1)
    with pytest.raises(InputError, match="another version of cds sweep"):
        sweep_ndjson(population["ndjson"], sweep_options(tmp_path, resume=True))


def test_resume_without_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing to resume"):
        sweep_ndjson(tmp_path, sweep_options(tmp_path / "out", resume=True))


def test_cli_sweep_ndjson(
    population: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "sweep",
            "--ndjson",
            str(population["ndjson"]),
            "--out",
            str(tmp_path),
            "--as-of",
            "2026-11-01",
            "--workers",
            "1",
            "--trial",
            "NCT05610826",
        ]
    )
    out = capsys.readouterr()
    assert status == 0
    assert "NCT05610826" in out.out and "NCT04339036" not in out.out
    assert "evaluating" in out.err  # plain progress lines when not a terminal
    first = json.loads((tmp_path / "results.ndjson").read_text().splitlines()[0])
    assert [t["trial"] for t in first["trials"]] == ["NCT05610826"]


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "sweep",
                "--ndjson",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o"),
                "--as-of",
                "2026-11-01",
            ]
        )
        == 2
    )
    assert "not a directory" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--ndjson",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--as-of",
                "11/01/2026",
            ]
        )
        == 2
    )


def test_unreadable_lines_and_foreign_types_are_counted_not_fatal(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_population(Population(5, seed=1, net_every=0), src, "ndjson")
    with open(src / "Observation.ndjson", "a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write(
            json.dumps(
                {
                    "resourceType": "Encounter",
                    "id": "e1",
                    "subject": {"reference": "Patient/syn-1-0000001"},
                }
            )
            + "\n"
        )
        f.write('{"resourceType":"Observation","id":"cut"\n')  # cut short, no newline after
    summary = sweep_ndjson(src, sweep_options(tmp_path / "out"))
    assert summary["patients"] == 5
    assert summary["errors"] == 0
    assert summary["input"]["unreadable_lines"] == 2
    assert summary["input"]["skipped_types"] == {"Encounter": 1}


def test_a_patient_with_a_line_that_is_not_json_gets_no_result(tmp_path: Path) -> None:
    """A line that routes to its patient but does not parse could be the record that excludes
    them: that patient is an error with the reason, never evaluated without it."""
    src = tmp_path / "in"
    write_population(Population(3, seed=1, net_every=0), src, "ndjson")
    with open(src / "Observation.ndjson", "a", encoding="utf-8") as f:
        f.write(
            '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":'
            '"http://loinc.org","code":"777-3"}]},"subject":{"reference":'
            '"Patient/syn-1-0000001"},"valueQuantity":{"value":12 34}}\n'
        )
    summary = sweep_ndjson(src, sweep_options(tmp_path / "out"))
    assert summary["patients"] == 2
    assert summary["errors"] == 1
    lines = sweep_lines(tmp_path / "out")
    assert len(lines) == 2
    assert not any('"Patient/syn-1-0000001"' in line for line in lines)
    errors = (tmp_path / "out" / "summary.json").read_text()
    assert "syn-1-0000001" in errors and "not JSON" in errors


def test_synthea_sample_sweeps_without_error_or_candidate(tmp_path: Path) -> None:
    if not SYNTHEA.is_dir():
        pytest.skip(f"{SYNTHEA} not present")
    # The sample is transaction bundles with urn:uuid references: written out as NDJSON with
    # references resolved to Type/id, as a Bulk export would give them.
    src = tmp_path / "ndjson"
    src.mkdir()
    files: dict[str, Any] = {}
    with ExitStack() as stack:
        for path in sorted(SYNTHEA.glob("*.json")):
            content = bundle_resources(json.loads(path.read_text()), source=str(path))
            resources, aliases = content.resources, content.aliases
            for resource in resources:
                text = json.dumps(resource)
                for alias, target in aliases.items():
                    if alias.startswith("urn:uuid:") and alias in text:
                        text = text.replace(f'"{alias}"', f'"{target}"')
                rtype = resource["resourceType"]
                if rtype not in files:
                    path_out = src / f"{rtype}.ndjson"
                    files[rtype] = stack.enter_context(open(path_out, "w", encoding="utf-8"))
                files[rtype].write(text + "\n")
    summary = sweep_ndjson(src, sweep_options(tmp_path / "out", workers=2))
    assert summary["patients"] == 50
    assert summary["errors"] == 0
    for trial in summary["trials"].values():
        assert trial["status"]["candidate"] == 0
    with open(tmp_path / "out" / "candidates.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert all(r[2] != "candidate" for r in rows[1:])


def test_a_server_that_is_down_stops_the_sweep_with_a_clear_message(tmp_path: Path) -> None:
    base = "http://127.0.0.1:9/fhir"  # discard port: nothing listens
    client = FhirClient(
        base_url=base,
        trusted_base_urls=[base],
        allow_insecure_loopback=True,
        retry=RetryPolicy(attempts=1),
        timeouts=Timeouts(connect=1, read=1),
    )
    with pytest.raises(FhirError, match="127.0.0.1:9"):
        sweep_rest(client, sweep_options(tmp_path), RestOptions())


def test_progress_bar_on_a_terminal_and_lines_elsewhere() -> None:
    tty = io.StringIO()
    bar = Progress("sweeping", 100, stream=tty, tty=True)
    bar.advance(50)
    bar.close()
    assert "\r" in tty.getvalue() and "ETA" in tty.getvalue() and "patients/s" in tty.getvalue()
    plain = io.StringIO()
    bar = Progress("sweeping", 100, stream=plain, tty=False, interval=0)
    bar.advance(10)
    bar.close()
    assert "\r" not in plain.getvalue()
    assert plain.getvalue().splitlines()[-1].startswith("sweeping: 10/100")


def test_rate_limiter_spaces_requests() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.acquire()
    assert now[0] == pytest.approx(1.0)  # 5 requests at 4/s: the fifth at t = 1 s


def test_export_supported_reads_the_capability_statement() -> None:
    system = {"rest": [{"operation": [{"name": "export"}]}]}
    group = {"rest": [{"resource": [{"type": "Group", "operation": [{"name": "export"}]}]}]}
    assert export_supported(system) and not export_supported(group)
    assert export_supported(group, group=True)
    assert not export_supported({"rest": [{"operation": [{"name": "validate"}]}]})
    assert export_supported(
        {"instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]}
    )


def test_write_back_condition_follows_the_server_search_parameters() -> None:
    capability = {
        "rest": [
            {
                "resource": [
                    {"type": "ResearchStudy", "searchParam": [{"name": "identifier"}]},
                    {"type": "ResearchSubject", "searchParam": [{"name": "_tag"}]},
                ]
            }
        ]
    }
    assert identifier_searchable(capability, "ResearchStudy")
    assert not identifier_searchable(capability, "ResearchSubject")
    assert identifier_searchable(None, "ResearchSubject")


def test_code_prefilter_keeps_every_line_the_criteria_read() -> None:
    """Lines skipped unparsed are exactly resources the record itself would drop as
    irrelevant: checked over a generated population against the record's own relevance test,
    for every clinical type, and for codes written the ways the record tolerates."""
    import json as _json

    from cds.criteria import load_trials as _load
    from cds.criteria.record import CLINICAL_TYPES, PatientRecord
    from cds.sweep.ndjson import CodePrefilter
    from cds.synthetic import Population as _Population

    trials = _load()
    keep = CodePrefilter(trials)
    skipped: dict[str, int] = {}
    kept_relevant = 0
    blocks: dict[str, list[bytes]] = {}
    for resources in _Population(patients=60, seed=11):
        patient = resources[0]
        for resource in resources[1:]:
            if resource["resourceType"] not in CLINICAL_TYPES:
                continue
            line = _json.dumps(resource, separators=(",", ":")).encode()
            blocks.setdefault(resource["resourceType"], []).append(line + b"\n")
            record = PatientRecord.from_resources([resource], trials, patient=patient)
            if any(record.entries.values()):
                kept_relevant += 1
                assert keep(line), resource["id"]
            elif not keep(line):
                skipped[resource["resourceType"]] = skipped.get(resource["resourceType"], 0) + 1
    assert kept_relevant > 0
    # vital signs, routine diagnoses, procedures and drugs are all skipped unparsed
    assert {"Observation", "Condition", "Procedure", "MedicationRequest"} <= set(skipped)
    # codes as the record tolerates them: padded, ICD-10-CM without its dot or in lower case
    odd = []
    for code in (" 718-7 ", "c7a.1", "C7A1", "c7b.02"):
        line = b'{"resourceType":"Condition","code":{"coding":[{"code":"%s"}]}}' % code.encode()
        assert keep(line), code
        odd.append(line + b"\n")
    # a disease or procedure named only in words (text signals): kept, by both tests
    worded = {
        "Condition": b'{"resourceType":"Condition","code":{"text":"Pancreatic NET"}}',
        "Procedure": b'{"resourceType":"Procedure","code":{"text":"Y-90 to liver"}}',
    }
    for rtype, line in worded.items():
        assert keep(line), line
        blocks[rtype].append(line + b"\n")
    # the whole-block search finds every line the line test keeps
    blocks["Condition"] += odd
    for rtype, lines in blocks.items():
        candidates = keep.candidate_lines(b"".join(lines), rtype.encode())
        assert candidates is not None
        kept = {line for line in lines if keep(line)}
        assert kept <= {line for line, _ in candidates}, rtype
        # "certain" is never said of a line the line test would drop
        assert all(line in kept for line, certain in candidates if certain), rtype
        assert len(candidates) < len(lines), rtype
    assert not keep(b'{"resourceType":"Condition","code":{"coding":[{"code":"I10"}]}}')
    # a key that only ends in "code" is not the key "code", and hides no real one after it
    decoy = (
        b'{"resourceType":"Condition","postalcode":"718-7","code":{"coding":[{"code":"I10"}]}}\n'
    )
    assert not keep(decoy) and keep.candidate_lines(decoy, b"Condition") == []
    real = decoy.replace(b'"I10"', b'"718-7"')
    assert keep(real) and keep.candidate_lines(real, b"Condition") == [(real, True)]
    # a drug named by reference to a Medication resource is judged once resolved
    by_reference = b'{"resourceType":"MedicationRequest","medicationReference":{"reference":"x"}}'
    assert keep(by_reference)
    assert keep.candidate_lines(by_reference + b"\n", b"MedicationRequest") is None


def test_only_uniform_compact_blocks_skip_the_line_by_line_path() -> None:
    """A block is searched as a whole only when every line is a closed compact object of one
    type; a blank, cut-short, foreign, spaced or unterminated line sends it line by line."""
    from cds.sweep.ndjson import _uniform_type

    first = b'{"resourceType":"Observation","id":"1"}\n'
    last = b'{"resourceType":"Observation","id":"2"}\n'
    assert _uniform_type(first + last) == (b"Observation", 2)
    for odd in (
        b"\n",
        b'{"resourceType":"Observation","id":"x"\n',
        b"not json\n",
        b'{"resourceType":"Patient","id":"p"}\n',
        b' {"resourceType":"Observation","id":"3"}\n',
    ):
        assert _uniform_type(first + odd + last) is None, odd
    assert _uniform_type(first + b'{"resourceType":"Observation","id":"3"}') is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"resourceType":"Observation","subject":{"reference":"Patient/a"}}\n', b"a"),
        (b'{"resourceType":"Observation","subject": {"reference": "Patient/a"}}\n', b"a"),
        (b'{"resourceType":"Observation","subject":{"reference":"http://x/Patient/a"}}\n', b"a"),
        (b'{"resourceType":"Observation","subject":{"reference":"Patient/a/_history/2"}}\n', b"a"),
        (
            b'{"resourceType":"Observation","note":[{"text":"subject"}],'
            b'"subject":{"reference":"Patient/a"}}\n',
            b"a",
        ),
        (
            b'{"resourceType":"Observation","subject":{"reference":"Patient/a"},'
            b'"x":{"subject":{"reference":"Patient/a"}}}\n',
            b"a",
        ),
        # Must be parsed to be sure: two patients, a contained resource, no reference, an
        # escape, a group.
        (
            b'{"resourceType":"Observation","subject":{"reference":"Patient/a"},'
            b'"patient":{"reference":"Patient/b"}}\n',
            None,
        ),
        (
            b'{"resourceType":"Observation","subject":{"reference":"Patient/a"},"contained":[]}\n',
            None,
        ),
        (b'{"resourceType":"Observation","subject":"Patient/a"}\n', None),
        (b'{"resourceType":"Observation","subject":{"reference":"Patient/a\\"b"}}\n', None),
        (b'{"resourceType":"Observation","subject":{"reference":"Group/a"}}\n', None),
    ],
)
def test_fast_patient_id_reads_only_what_it_can_be_sure_of(
    line: bytes, expected: bytes | None
) -> None:
    assert ndjson_module._fast_patient_id(line) == expected
