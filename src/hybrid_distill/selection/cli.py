"""``hybrid-distill select``: options and entry point."""

from __future__ import annotations

import json
from typing import Any

from ..config import ConfigError, add_flags, flag_values, parse_int, read_config_file
from ..data import add_data_flags, data_config_from_flags
from .config import SelectionConfig


def add_select_arguments(parser) -> None:
    g = parser.add_argument_group("models and folders")
    g.add_argument("--teacher", required=True, help="HF path / hub id, or tiny:<variant>")
    g.add_argument("--run-dir", required=True, help="selection directory (shared by selectors; candidates are reused)")
    g.add_argument("--base", default=None, help="all-linear student after Stage 1 (+2) to score from; default: distill one")
    g.add_argument("--stage1-student", default=None, help="Stage-1 all-linear student (GR candidates' mixers; needed with --base for gr/avg selectors)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--config", default=None, help="YAML/JSON file of SelectionConfig fields (flags given override it)")
    g.add_argument("--reference", default=None, help="selection.json to compare against (Jaccard, tokens saved)")
    g.add_argument("--no-progress", action="store_true")
    add_flags(parser, SelectionConfig, prefix="sel_", title="selection (SelectionConfig fields)")
    c = parser.add_argument_group("candidate and base budgets (shortcuts for SelectionConfig.stage1 / stage2)")
    c.add_argument("--seq-len", type=parse_int, default=None, help="candidate sequence length (Stage 1 and 2)")
    c.add_argument("--global-batch-size", type=parse_int, default=None)
    c.add_argument("--candidate-tokens", type=parse_int, default=None, help="Stage-2 tokens per candidate")
    c.add_argument("--candidate-stage1-tokens", type=parse_int, default=None, help="Stage-1 tokens per candidate (default: none)")
    c.add_argument("--base-stage1-tokens", type=parse_int, default=None, help="when distilling the base: Stage-1 tokens")
    c.add_argument("--base-stage2-tokens", type=parse_int, default=None, help="when distilling the base: Stage-2 tokens (0: skip)")
    add_data_flags(parser)


def config_from_select_args(ns: dict[str, Any]) -> SelectionConfig:
    """`SelectionConfig` from a config file (if any), then the flags given (a flag left out keeps the file's value)."""
    data: dict[str, Any] = read_config_file(ns["config"], SelectionConfig) if ns.get("config") else {}
    data.update(flag_values(ns, SelectionConfig, prefix="sel_"))
    for key in ("stage1", "stage2"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{ns['config']}: {key} must be a mapping of DistillConfig fields, got {data[key]!r}")
    shared = {k: ns[k] for k in ("seq_len", "global_batch_size") if ns.get(k)}
    if shared or ns.get("candidate_tokens"):
        stage2 = {**(data.get("stage2") or {}), **shared}
        if ns.get("candidate_tokens"):
            stage2["target_tokens"] = ns["candidate_tokens"]
        data["stage2"] = stage2
    if ns.get("candidate_stage1_tokens"):
        data["stage1"] = {**(data.get("stage1") or {}), **shared, "target_tokens": ns["candidate_stage1_tokens"]}
    return SelectionConfig.from_dict(data)


def run_select_from_args(args) -> int:
    from .runner import run_selection

    ns = dict(vars(args))
    config = config_from_select_args(ns)
    data = data_config_from_flags(ns).to_dict()
    shared = {k: ns[f] for f, k in (("seq_len", "seq_len"), ("global_batch_size", "global_batch_size")) if ns.get(f)}
    base_stages = {"stage1": {**shared, "target_tokens": ns.get("base_stage1_tokens") or 100_000_000}}
    s2 = ns.get("base_stage2_tokens")
    base_stages["stage2"] = None if s2 == 0 else {**shared, "target_tokens": s2 or 600_000_000}
    selection = run_selection(
        config, ns["teacher"], ns["run_dir"], data=data, base_student=ns.get("base"),
        stage1_student=ns.get("stage1_student"), tokenizer=ns.get("tokenizer"), base_stages=base_stages,
        reference=ns.get("reference"), progress=not ns.get("no_progress"),
    )
    summary = {
        "selection": f"{ns['run_dir']}/{config.selector}/selection.json",
        "ranking": selection.get("ranking"),
        "budgets": {label: e["layers"] for label, e in selection["budgets"].items()},
        "tokens": selection.get("tokens"),
        "failed": list((selection.get("failed") or {}).keys()),
    }
    print(json.dumps(summary, indent=2))
    return 0


def add_replay_arguments(parser) -> None:
    parser.add_argument("selection", help="selection.json (or its folder) of a full-budget learned-selector run")
    parser.add_argument("--early-stop", action="store_true", help="replay the rolling-Jaccard early stop")
    parser.add_argument("--racing", action="store_true", help="replay racing (successive halving)")
    parser.add_argument("--window", type=int, default=None, help="early_stop_window (snapshots)")
    parser.add_argument("--min-jaccard", type=float, default=None, help="early_stop_min_jaccard")
    parser.add_argument("--round-snapshots", type=int, default=None, help="snapshots per round (decision points)")
    parser.add_argument("--keep-fraction", type=float, default=None, help="racing_keep_fraction")


def run_replay_from_args(args) -> int:
    """Print (JSON) what early stopping / racing would have spent and chosen on a full run."""
    from .replay import replay_selection

    if not (args.early_stop or args.racing):
        raise SystemExit("hybrid-distill replay: give --early-stop, --racing or both")
    changes = {name: value for name, value in (("early_stop_window", args.window), ("early_stop_min_jaccard", args.min_jaccard),
                                               ("round_snapshots", args.round_snapshots),
                                               ("racing_keep_fraction", args.keep_fraction)) if value is not None}
    print(json.dumps(replay_selection(args.selection, early_stop=args.early_stop, racing=args.racing, **changes), indent=2))
    return 0
