"""``python -m fastcps.fetch --config CONFIG [--set k=v ...] [--dry-run]``: download every file the run
config needs into this machine's caches and say what and how large (per item and in total).

``--prompt-set NAME`` (repeatable) fetches named prompt sets without a config. ``--dry-run`` lists
without downloading (sizes from the hub's metadata when online, "unknown" offline). The source images of
edit rows are listed too: URL ones downloaded, then every one checked to exist and decode. Exit 0 when
everything is here, 2 on a config error or a failed download (the item, its config key and why)."""

from __future__ import annotations

import argparse
import sys

from fastcps.fetch import core, hub
from fastcps.fetch.items import EditImages, HubRepo, PromptSetFile


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fastcps.fetch", description="Download every file a fastcps run config needs."
    )
    p.add_argument("--config", help="JSON run config (configs/*.json)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as for training"
    )
    p.add_argument(
        "--prompt-set", action="append", default=[], metavar="NAME", help="a named prompt set (repeatable)"
    )
    p.add_argument("--dry-run", action="store_true", help="list what is needed, download nothing")
    return p.parse_args(argv)


def items_of(args) -> list:
    from fastcps import prompt_sets
    from fastcps.config import RunConfig, load_config
    from fastcps.fetch.needs import config_items

    items = []
    if args.config:
        items += config_items(load_config(RunConfig, args.config, args.overrides))
    for name in args.prompt_set:
        prompt_sets.get(name, "--prompt-set")
        items.append(PromptSetFile(name, "--prompt-set"))
    if not items and not args.config:
        raise ValueError("give --config CONFIG (or --prompt-set NAME)")
    return items


def table(rows: list[core.Row]) -> str:
    cells = [
        (r.item.key, f"{r.item.label}  ({r.item.what})", hub.human(r.size), r.state, r.detail) for r in rows
    ]
    w = [max((len(c[i]) for c in cells), default=0) for i in range(4)]
    lines = [
        f"  {k:<{w[0]}}  {lab:<{w[1]}}  {s:>{w[2]}}  {st:<{w[3]}}  {d}".rstrip() for k, lab, s, st, d in cells
    ]
    known = sum(r.size for r in rows if r.size is not None)
    todo = [r for r in rows if r.state in (core.DOWNLOAD, core.ON_BUILD)]
    todo_known = sum(r.size for r in todo if r.size is not None)

    def unknown(rs):
        n = sum(r.size is None for r in rs)
        return f" + {n} item{'s' * (n > 1)} of unknown size" if n else ""

    total = f"total {hub.human(known)}{unknown(rows)}; to fetch: {hub.human(todo_known)}{unknown(todo)}"
    return "\n".join(lines + [total])


def main(argv=None) -> int:
    from fastcps.config import ConfigError

    args = parse_args(argv)
    try:
        items = items_of(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    online = not hub.offline()
    rows, failed = [], []
    for it in items:
        try:
            rows.append(core.survey(it, online))
        except FileNotFoundError as err:  # the hub refused to list a repo: gated, missing, unreachable
            failed.append(str(err))
    print(
        f"[fastcps] {len(items)} items; hub cache {hub.cache_dir()}{'' if online else ' (HF_HUB_OFFLINE=1)'}"
    )
    print(table(rows), flush=True)
    for row in rows:
        if row.state == core.MISSING:
            failed.append(_missing(row))
        elif args.dry_run or row.state not in (core.DOWNLOAD, core.ON_BUILD):
            continue
        elif not online and isinstance(row.item, (HubRepo, PromptSetFile, EditImages)):
            failed.append(f"{row.item.label} (config key `{row.item.key}`): not here and HF_HUB_OFFLINE=1")
        else:
            print(f"[fastcps] fetching {row.item.label} ({hub.human(row.size)}) ...", flush=True)
            try:
                core.get(row)
            except FileNotFoundError as err:
                failed.append(str(err))
    if not failed and not args.dry_run:
        failed += _unreadable_images(rows)
    if failed:
        print("[fastcps] fetch failed:\n" + "\n".join(f"  - {f}" for f in failed), file=sys.stderr)
        return 2
    if not args.dry_run:
        print(
            "[fastcps] everything is here. A multi-node run needs it on every node (run this there too, or "
            "share HF_HOME); the DeepSpeed launcher passes HF_HOME, HF_TOKEN and HF_HUB_OFFLINE to other "
            "nodes only through a .deepspeed_env file (one KEY=VALUE a line)",
            flush=True,
        )
    return 0


def _missing(row: core.Row) -> str:
    if isinstance(row.item, EditImages):  # every missing image by row and line, with the fix
        from fastcps.edit_images import check_edit_images

        try:
            check_edit_images(row.item.source, row.item.key)
        except FileNotFoundError as err:
            return str(err)
    return f"{row.item.what} {row.item.label!r}: {row.detail}"


def _unreadable_images(rows: list[core.Row]) -> list[str]:
    """Every edit image here decodes (a download, or a file the config names): the errors of those that
    do not, as the trainer's start-up check would give them."""
    from fastcps.edit_images import check_edit_images

    out = []
    for row in rows:
        if isinstance(row.item, EditImages):
            try:
                check_edit_images(row.item.source, row.item.key)
            except FileNotFoundError as err:
                out.append(str(err))
    return out


if __name__ == "__main__":
    sys.exit(main())
