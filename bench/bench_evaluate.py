"""Engine cost on one very long record, as a ratio to json.loads of the same bundle.

A generated NET patient with 2,000 Observations, 200 Conditions, 100 Procedures and 100
medication resources (cds.synthetic.big_patient). Measured in one process, median of repeats:
(a) records_from_bundle + evaluate (both trials) on the parsed dict, (b) the same end to end
from the JSON text. Target: (a) <= 3x json.loads. With --profile, prints the hot spots.

Usage: .venv/bin/python bench/bench_evaluate.py [--repeat 30] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from cds.criteria import load_trials
from cds.criteria.engine import evaluate
from cds.fhir.bundle import records_from_bundle
from cds.synthetic import ANCHOR, as_bundle, big_patient


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    text = json.dumps(as_bundle(big_patient(), "big"))
    trials = load_trials()
    parsed = json.loads(text)

    # The production path (`cds evaluate`, the sweep, the hooks): records skip what no
    # criterion reads. The "every resource indexed" variant is printed beside it.
    def engine() -> None:
        for record in records_from_bundle(parsed, trials, source="bench"):
            evaluate(record, trials, ANCHOR)

    class EveryCodeRelevant:
        valuesets_of = trials.valuesets_of
        text_signals_for = trials.text_signals_for

        def is_relevant(self, key: tuple[str, str]) -> bool:
            return True

    def engine_unfiltered() -> None:
        for record in records_from_bundle(parsed, EveryCodeRelevant(), source="bench"):
            evaluate(record, trials, ANCHOR)

    def end_to_end() -> None:
        bundle = json.loads(text)
        for record in records_from_bundle(bundle, trials, source="bench"):
            evaluate(record, trials, ANCHOR)

    engine()  # warm-up: trial loading, lazy imports, caches
    t_parse = median_seconds(lambda: json.loads(text), args.repeat)
    t_engine = median_seconds(engine, args.repeat)
    t_unfiltered = median_seconds(engine_unfiltered, args.repeat)
    t_e2e = median_seconds(end_to_end, args.repeat)
    print(f"bundle: {len(text) / 1e6:.2f} MB, {len(parsed['entry'])} resources")
    print(f"json.loads                          {t_parse * 1000:8.2f} ms  (baseline)")
    print(
        f"(a) records_from_bundle + evaluate  {t_engine * 1000:8.2f} ms  "
        f"{t_engine / t_parse:5.2f}x json.loads  (target <= 3x)"
    )
    print(
        f"    same, every resource indexed    {t_unfiltered * 1000:8.2f} ms  "
        f"{t_unfiltered / t_parse:5.2f}x json.loads"
    )
    print(
        f"(b) end to end incl. json.loads     {t_e2e * 1000:8.2f} ms  "
        f"{t_e2e / t_parse:5.2f}x json.loads"
    )
    if args.profile or t_engine / t_parse > 3:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            engine()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
