"""`ablate`: the command line. One subcommand per job; each parses its options and calls one function.

Bad input anywhere ends as one line `error: <file>: <key>: <message>` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ablations.errors import SpecError

FORMATS = ("table", "csv", "json")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


# --------------------------------------------------------------------------------------------------
# complexity


def complexity_rows(sweep_name: str, profile_name: str, overrides: list[str]) -> list[dict]:
    """One row per setting: exact params/MACs, the paper's precision, and the published values."""
    from ablations.complexity import complexity
    from ablations.paper import published_row
    from ablations.patch import build_model
    from ablations.spec import load_profile, load_sweep, run_config

    sweep = load_sweep(sweep_name)
    profile = load_profile(profile_name, overrides)
    rows = []
    for i, setting in enumerate(sweep.settings):
        cfg = run_config(profile, setting, seed=0, sweep=sweep.name)
        try:
            model = build_model(cfg.backbone, cfg.se)
        except SpecError as e:
            raise e.within(sweep.path, f"settings[{i}]") from None
        c = complexity(model, cfg.data.input_size, cfg.backbone.in_chans)
        paper = published_row(sweep.table, setting.label)
        rows.append({
            "setting": setting.label,
            "params_m": round(c.params_m, 1),  # the paper's precision
            "gflops": round(c.gflops, 2),
            "paper_params_m": paper["params_m"],
            "paper_gflops": paper["gflops"],
            "params": c.params,  # exact
            "macs": c.macs,
        })
    return rows


def cmd_complexity(args: argparse.Namespace) -> int:
    import pandas as pd

    rows = complexity_rows(args.sweep, args.profile, args.set)
    df = pd.DataFrame(rows)
    if args.format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(df.to_string(index=False, na_rep="-"))
    return 0


# --------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ablate", description="SE ablation runner (SENet Tables 10-16, Fig. 6/7).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    c = sub.add_parser("complexity", help="params and GFLOPs (MACs) per setting, beside the paper's")
    c.add_argument("sweep", help="sweep name (ratio, stages, ...) or YAML path")
    c.add_argument("--profile", default="paper", help="profile name or YAML path (default: paper)")
    c.add_argument("--format", choices=FORMATS, default="table")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key, e.g. data.input_size=160 (repeatable)")
    c.set_defaults(func=cmd_complexity)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
