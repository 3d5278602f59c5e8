"""``vitlens report STUDY_DIR``: rebuild a study's report.html from its saved results.json (no training)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild a study's report.html from its results.json (no retraining)")
    p.add_argument("study_dir", help="the directory `vitlens study` wrote (holds results.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..study.report import build_report

    print(build_report(args.study_dir))
    return 0
