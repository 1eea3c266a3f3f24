"""Mutation testing of the critical modules with cosmic-ray: which small edits would the tests miss?

For each module below, cosmic-ray writes one mutant at a time into the source file, runs only
the few test files that cover that module (``-x``: the first failure kills the mutant) and
restores the file. A mutant that every test survives is a line that can be mistyped without a
test noticing; each survivor is either killed by a new test or explained in
``docs/MUTATION.md``.

The operator set is cut down to what a 2-core machine can run and what finds real gaps: every
``+ - * /`` swapped with its inverse, ``**`` with ``*``, comparison boundaries (``<``/``<=``,
``>``/``>=``), negations (``==``/``!=``, ``is``/``is not``, ``in``/``not in``), numbers ±1,
unary operators deleted (and ``-`` made ``+``), ``and``/``or``, ``True``/``False``, ``not``
added, loops run zero times, ``break``/``continue`` swapped, decorators removed and caught
exceptions replaced. The
random variable inserter/replacer and the exotic binary swaps (``%``, shifts, bit operators for
arithmetic) are left out.

cosmic-ray cannot delete a statement, so the calls whose deletion the suite once missed
(``os.fsync``, the exposure check, the precision gate) are *hand mutants* here: the line is
removed the same way (on disk, restored after) and the same test command must fail.

    python benchmarks/mutation.py --label after              # every module (~2 h, busy 2 cores)
    python benchmarks/mutation.py features losses            # some modules
    python benchmarks/mutation.py --label after --only-survivors-of benchmarks/results/mutation-before.json

Mutating edits the working tree in place: run it on a clean tree and do not run tests beside
it. A run that is interrupted leaves at most one mutant on disk; ``git checkout`` the module.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import RESULTS, provenance

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "mutation"
PYTEST = (f"{shlex.quote(sys.executable)} -B -m pytest -x -q -p no:randomly -p no:cacheprovider "
          "-p no:timeout")

KEPT_BINARY = "Add_Sub|Sub_Add|Mul_Div|Div_Mul|Pow_Mul|FloorDiv_Div|Mod_FloorDiv|BitOr_BitAnd|BitAnd_BitOr"
KEPT_COMPARISON = "Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq|Is_IsNot|IsNot_Is|In_NotIn|NotIn_In"
EXCLUDED_OPERATORS = [
    rf"core/ReplaceBinaryOperator_(?!({KEPT_BINARY})$)",
    rf"core/ReplaceComparisonOperator_(?!({KEPT_COMPARISON})$)",
    r"core/ReplaceUnaryOperator_(?!(Delete_USub|Delete_Not|Delete_Invert|USub_UAdd)$)",
    r"core/VariableInserter",
    r"core/VariableReplacer",
]


@dataclass(frozen=True)
class HandMutant:
    """A statement deleted by hand: the ``occurrence``-th line that starts with ``line``
    (stripped) becomes ``pass``."""

    path: str
    line: str
    occurrence: int = 0


@dataclass(frozen=True)
class Module:
    """Source files mutated together and the tests (pytest arguments) that must catch them.

    ``functions`` (qualified names, e.g. ``EngineCore._fail``) limits the mutants to those
    functions' lines; ``sample`` draws that many mutants (seeded, :data:`SEED`) when there are
    more, so that a module's run fits a 2-core machine; ``timeout`` is per mutant.
    """

    paths: tuple[str, ...]
    tests: str
    functions: tuple[str, ...] = ()
    sample: int | None = 30
    timeout: float = 300.0
    hand: tuple[HandMutant, ...] = ()


SEED = 21
MODULES: dict[str, Module] = {
    "features": Module(("engine/base/features.py",),
                       "tests/test_features.py tests/test_datasets.py tests/test_models.py "
                       "-k 'test_features or padding or feature_input'", sample=40),
    "metrics": Module(("engine/base/metrics",), "tests/test_metrics.py"),
    "fusion": Module(("engine/runtime/fusion.py",), "tests/test_fusion.py tests/test_pipeline.py"),
    "pipeline": Module(("engine/runtime/pipeline.py",),
                       "tests/test_pipeline.py tests/test_rankings.py"),
    "topk": Module(("engine/runtime/topk.py",), "tests/test_topk.py",
                   hand=(HandMutant("engine/runtime/topk.py", "os.fsync(log.fileno())", 1),)),
    "rankings": Module(("engine/runtime/rankings.py",),
                       "tests/test_rankings.py tests/test_topk.py"),
    "security": Module(("engine/service/security.py",), "tests/test_security.py"),
    "service": Module(("engine/service/app.py", "engine/service/core.py"),
                      "tests/test_server.py -k 'state or exposure or fsynced'",
                      functions=("_Server.bind", "_Server.load", "_Server._unhealthy",
                                 "EngineCore._check_state", "EngineCore._state_failure_error",
                                 "EngineCore._add_and_commit", "EngineCore._fail",
                                 "EngineCore._add_and_commit_durably"),
                      sample=6, timeout=900.0,
                      hand=(HandMutant("engine/service/app.py", "security.check_exposure("),)),
    "losses": Module(("training/losses.py",),
                     "tests/test_losses.py tests/test_models.py "
                     "-k 'test_losses or kl or loss or bce or lambda'"),
    "export-gates": Module(("export/precision.py", "export/exporter.py"),
                           "tests/test_export.py -k 'gates_fail_loudly or precision_gate'",
                           functions=("check_map_difference",),
                           sample=None, timeout=900.0,
                           hand=(HandMutant("export/exporter.py", "check_map_difference("),)),
    "submission": Module(("engine/base/submission.py",), "tests/test_submission.py"),
}


def test_command(module: Module) -> str:
    """The module's pytest command; test files not written yet (a run before them) are left out."""
    words = shlex.split(module.tests)
    kept = [w for w in words if not w.startswith("tests/") or (ROOT / w).exists()]
    return f"{PYTEST} {shlex.join(kept)}"


def function_lines(paths: tuple[str, ...], functions: tuple[str, ...]) -> dict[str, list[range]]:
    """Line ranges of the named functions (``Class.method`` or ``function``) per file."""
    ranges: dict[str, list[range]] = {}
    for path in paths:
        tree = ast.parse((ROOT / path).read_text())
        for node in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
            for child in node.body:
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    prefix = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
                    if f"{prefix}{child.name}" in functions:
                        ranges.setdefault(path, []).append(range(child.lineno, child.end_lineno + 1))
    return ranges


def mutant_key(mutation) -> str:
    """A mutant's name that stays the same across runs on the same source."""
    return (f"{Path(mutation.module_path).as_posix()}:{mutation.start_pos[0]} "
            f"{mutation.operator_name.removeprefix('core/')} #{mutation.occurrence}")


def select(session: Path, module: Module, only: set[str] | None) -> None:
    """Skip the mutants outside ``module.functions``, then all but a seeded sample (or, with
    ``only``, all but those mutants)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    ranges = function_lines(module.paths, module.functions) if module.functions else None
    with use_db(str(session), WorkDB.Mode.open) as db:
        items = sorted(db.pending_work_items, key=lambda item: mutant_key(item.mutations[0]))

        def inside(item) -> bool:
            mutation = item.mutations[0]
            return any(mutation.start_pos[0] in r
                       for r in ranges.get(Path(mutation.module_path).as_posix(), []))

        kept = [item for item in items if ranges is None or inside(item)]
        if only is not None:
            kept = [item for item in kept if mutant_key(item.mutations[0]) in only]
        elif module.sample is not None and len(kept) > module.sample:
            kept = random.Random(SEED).sample(kept, module.sample)
        dropped = {item.job_id for item in items} - {item.job_id for item in kept}
        if dropped:
            db.set_multiple_results(dropped, WorkResult(output="not selected",
                                                        worker_outcome=WorkerOutcome.SKIPPED))


def config_text(module: Module) -> str:
    """The cosmic-ray session config (TOML) of one module."""
    lines = [
        "[cosmic-ray]",
        f"module-path = {json.dumps(list(module.paths))}",
        f"timeout = {module.timeout}",
        "excluded-modules = []",
        f"test-command = {json.dumps(test_command(module))}",
        "",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "",
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}",
    ]
    return "\n".join(lines) + "\n"


COSMIC_RAY = {"cosmic-ray": "cosmic_ray.cli",
              "cr-filter-operators": "cosmic_ray.tools.filters.operators_filter"}


def cosmic(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run a cosmic-ray command with this interpreter (``python -m``, not a console script)."""
    command = [sys.executable, "-c", f"import sys; from {COSMIC_RAY[tool]} import main; "
               "sys.exit(main())", *args]
    return subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)


def run_cosmic_ray(name: str, module: Module, only: set[str] | None, resume: bool
                   ) -> tuple[dict[str, int], list[str]]:
    """Init, filter, select and execute one session (or, with ``resume``, go on with the
    one an interrupted run left) → outcome counts and survivors' keys."""
    WORK.mkdir(parents=True, exist_ok=True)
    config, session = WORK / f"{name}.toml", WORK / f"{name}.sqlite"
    config.write_text(config_text(module))
    if not (resume and session.exists()):
        session.unlink(missing_ok=True)
        cosmic("cosmic-ray", "init", str(config), str(session))
        cosmic("cr-filter-operators", str(session), str(config))
        select(session, module, only)
    cosmic("cosmic-ray", "exec", str(config), str(session))
    counts = {"killed": 0, "survived": 0, "incompetent": 0}
    survivors = []
    for line in cosmic("cosmic-ray", "dump", str(session)).stdout.splitlines():
        item, result = json.loads(line)
        if result is None or result["worker_outcome"] == "skipped":
            continue
        if result["worker_outcome"] != "normal":  # abnormal/exception: the mutant did not run
            counts["incompetent"] += 1
            continue
        outcome = {"killed": "killed", "survived": "survived"}.get(result["test_outcome"],
                                                                   "incompetent")
        counts[outcome] += 1
        if outcome == "survived":
            mutation = item["mutations"][0]
            survivors.append(f"{mutation['module_path']}:{mutation['start_pos'][0]} "
                             f"{mutation['operator_name'].removeprefix('core/')} "
                             f"#{mutation['occurrence']}")
            diff = (result.get("diff") or "").splitlines()
            changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            survivors[-1] += "  `" + " → ".join(c[1:].strip() for c in changed) + "`"
    return counts, survivors


def run_hand_mutant(module: Module, mutant: HandMutant) -> bool:
    """Delete the statement, run the module's tests, restore → True when a test failed."""
    path = ROOT / mutant.path
    original = path.read_text()
    lines = original.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip().startswith(mutant.line)]
    if len(hits) <= mutant.occurrence:
        raise SystemExit(f"hand mutant {mutant.line!r} #{mutant.occurrence}: {len(hits)} such "
                         f"lines in {mutant.path}")
    start = end = hits[mutant.occurrence]
    line = lines[start]
    indent = line[: len(line) - len(line.lstrip())]
    # a call spread over several lines: blank it up to its closing parenthesis
    depth = line.count("(") - line.count(")")
    while depth > 0:
        end += 1
        depth += lines[end].count("(") - lines[end].count(")")
    mutated = lines[:start] + [f"{indent}pass\n"] + lines[end + 1:]
    try:
        path.write_text("".join(mutated))
        result = subprocess.run(shlex.split(test_command(module)), cwd=ROOT, capture_output=True,
                                timeout=module.timeout * 3)
    finally:
        path.write_text(original)
    return result.returncode != 0


def report(label: str, record: dict, earlier: str | None) -> str:
    """The results file's markdown from the run's record (one entry per module)."""
    rows, details = [], []
    for name, entry in record.items():
        module = MODULES[name]
        score = entry["killed"] / entry["ran"] if entry["ran"] else float("nan")
        hand = ", ".join(f"`{line}` {'killed' if killed else 'SURVIVED'}"
                         for line, killed in entry["hand"].items()) or "–"
        rows.append(f"| {name} | {entry['ran']} | {entry['killed']} | {len(entry['survivors'])} | "
                    f"{entry['incompetent']} | {score:.1%} | {hand} | {entry['seconds']:.0f} |")
        details.append(f"### {name}\n\n- mutated: {', '.join(module.paths)}"
                       + (f" (functions {', '.join(module.functions)})" if module.functions else "")
                       + f"\n- tests: `{entry['tests']}`\n"
                       + ("- survivors:\n" + "".join(f"  - {s}\n" for s in entry["survivors"])
                          if entry["survivors"] else "- survivors: none\n"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    scope = (f"only the survivors of `{earlier}` rerun; the mutants it killed are counted as "
             "killed" if earlier else
             f"at most `sample` mutants per module (see MODULES), drawn with seed {SEED}")
    return (f"# Mutation scores: {label}\n\n{provenance()}\n- commit: {commit}\n"
            f"- mutants: {scope}\n"
            f"- cosmic-ray operators: all but {', '.join(f'`{e}`' for e in EXCLUDED_OPERATORS)}\n"
            "- score = killed (a test failed or timed out) / mutants run; incompetent mutants "
            "(cosmic-ray could not run them) are not counted; hand mutants: a statement "
            "deleted, which cosmic-ray does not do\n\n"
            "| module | mutants | killed | survived | incompetent | score | hand mutants | "
            "seconds |\n| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n"
            + "\n".join(rows) + "\n\n## Survivors\n\n" + "\n".join(details))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"some of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--label", default="current",
                        help="what this run measured; the results go to mutation-LABEL.md/.json "
                             "(modules run again replace their rows, the others are kept)")
    parser.add_argument("--only-survivors-of", type=Path, metavar="JSON",
                        help="run only the mutants that survived that earlier run (its .json)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the sessions an interrupted run left in runs/mutation")
    args = parser.parse_args()
    names = args.modules or list(MODULES)
    unknown = set(names) - set(MODULES)
    if unknown:
        parser.error(f"unknown modules {sorted(unknown)}: choose from {', '.join(MODULES)}")
    paths = [p for n in names for p in MODULES[n].paths]
    if subprocess.run(["git", "diff", "--quiet", "--", *paths], cwd=ROOT).returncode:
        raise SystemExit("the modules to mutate have uncommitted edits: commit or stash them first")
    earlier = json.loads(args.only_survivors_of.read_text()) if args.only_survivors_of else None
    markdown, record_path = RESULTS / f"mutation-{args.label}.md", RESULTS / f"mutation-{args.label}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}

    for name in names:
        module = MODULES[name]
        began = time.monotonic()
        only = None if earlier is None else {s.split("  ")[0] for s in earlier[name]["survivors"]}
        counts, survivors = run_cosmic_ray(name, module, only, args.resume)
        hand = {m.line: run_hand_mutant(module, m) for m in module.hand}
        ran, killed = counts["killed"] + counts["survived"], counts["killed"]
        if earlier is not None:  # the mutants the earlier run killed stay killed
            ran, killed = earlier[name]["ran"], earlier[name]["ran"] - counts["survived"]
        record[name] = {"ran": ran, "killed": killed, "incompetent": counts["incompetent"],
                        "survivors": survivors, "hand": hand, "seconds": time.monotonic() - began,
                        "tests": "pytest " + test_command(module).split(" pytest ", 1)[1]}
        record = {n: record[n] for n in MODULES if n in record}
        RESULTS.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        markdown.write_text(report(args.label, record, args.only_survivors_of and
                                   args.only_survivors_of.name))
        print(f"{name}: {killed}/{ran} killed, {len(survivors)} survived; wrote {markdown}",
              flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
