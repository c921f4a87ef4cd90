"""The ``vloop`` command. Each sub-command imports what it needs when it runs, so
``vloop --help`` stays fast and lists exactly the commands that exist."""

from __future__ import annotations

import argparse
import datetime as dt
import sys


def _cmd_config(args) -> int:
    from vloop.store.config import load_settings

    for env, value, doc in load_settings().describe():
        print(f"{env:24} {value}\n{'':24} {doc}")
    return 0


def _cmd_lake_ls(args) -> int:
    from vloop.store.lake import open_lake

    lake = open_lake(args.url)
    for key in lake.list(args.prefix):
        print(key)
    return 0


def _cmd_lake_check(args) -> int:
    """Round-trip a probe object: proves the URL, the credentials and write permission."""
    import uuid

    from vloop.store.lake import open_lake

    lake = open_lake(args.url)
    if args.images:  # a day's photos: present, hashing to their keys, decodable
        import json

        from vloop.capture.spool import check_images

        res = check_images(lake, args.images, repair=args.repair)
        print(json.dumps(res, indent=1))
        return 0 if not res["missing"] and not res["bad"] else 1
    key = f"_health/probe-{uuid.uuid4().hex}"
    payload = uuid.uuid4().bytes
    lake.put_bytes(key, payload)
    ok = lake.get_bytes(key) == payload
    lake.delete(key)
    print(f"{lake.url}: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _cmd_demo(args) -> int:
    from vloop.sim.demo_loop import LoopConfig, run_loop

    given = {"rounds": args.rounds, "seed": args.seed, "users_per_day": args.users_per_day,
             "label_days": args.label_days}  # those not given: LoopConfig's
    try:
        cfg = LoopConfig(keep=args.keep, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        print(f"vloop demo: {e}", file=sys.stderr)
        return 2
    run_loop(cfg)
    return 0


def _cmd_tiny_model(args) -> int:
    from vloop.sim.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed)
    print(f"tiny Qwen3-VL written to {out}")
    return 0


def _cmd_pretrain_base(args) -> int:
    from vloop.sim.pretrain import PretrainConfig, pretrain_base

    cfg = PretrainConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    pretrain_base(args.model, args.out, cfg)
    print(f"base model written to {args.out} (eval.json beside it)")
    return 0


def _cmd_rollout_status(args) -> int:
    from vloop.release.canary import simulated_now, status
    from vloop.store.lake import open_lake

    st = status(open_lake(args.url), now=simulated_now(args.now))
    print(f"serving state #{st['serving_state']}: champion {st['champion']}, canary {st['canary'] or '-'} "
          f"at {st['canary_share']:.0%}, holdout {st['holdout_share']:.0%}")
    pending = (st["experiment"] or {}).get("pending_promotion")
    if pending:
        print(f"promotion to champion awaits a person since {pending['requested_at']} (request {pending['id']}): "
              f"`vloop rollout approve --request {pending['id']}` or `vloop rollout reject --request {pending['id']}`")
    if "decision" not in st:
        print("no live experiment")
        return 0
    exp, d = st["experiment"], st["decision"]
    print(f"experiment {exp['id']}: stage {exp['stage'] + 1}/{len(exp['stages'])} "
          f"(shares {', '.join(f'{x:.0%}' for x in exp['stages'])}), stage began {exp['stage_started_at']}")
    print(st["counts"][["arm", "users", "requests", "accepted", "edited", "errors", "hours"]].to_string(index=False))
    for name, m in d.metrics.items():
        print(f"{name:10} champion {m.champion:.3f}  canary {m.canary:.3f}  difference {m.diff:+.3f} "
              # A difference of two rates lies in [-1, 1]; the interval's far side can overshoot.
              f"[{max(m.lower, -1.0):+.3f}, {min(m.upper, 1.0):+.3f}] (always-valid)")
    print(f"now: {d.action} — {d.reason}")
    return 0


def _cmd_rollout_rollback(args) -> int:
    from vloop.release.canary import rollback
    from vloop.store.lake import open_lake

    st = rollback(open_lake(args.url), reason=args.reason, to=args.to, actor=args.actor)
    print(f"serving state #{st.seq}: champion {st.champion or 'base'}, canary {st.canary or '-'} "
          "(replicas apply it at their next reconciliation)")
    return 0


def _cmd_rollout_step(args) -> int:
    from vloop.release.canary import simulated_now, step
    from vloop.store.lake import open_lake

    r = step(open_lake(args.url), actor=args.actor, now=simulated_now(args.now), approval=args.approval)
    print(r.summary)
    if r.action == "awaiting_approval":
        print("the promotion awaits a person: `vloop rollout approve` or `vloop rollout reject --comment ...`")
    return 0


def _cmd_rollout_answer(args) -> int:
    """approve / reject the pending promotion (vloop.release.approval.settle), as ``--by``."""
    from vloop.release.approval import settle
    from vloop.store.lake import open_lake

    r = settle(open_lake(args.url), args.rollout_command, by=args.by, comment=args.comment, via="terminal",
               request_id=args.request)
    print(r.message)
    print(f"serving state #{r.state.seq}: champion {r.state.champion or 'base'}, canary {r.state.canary or '-'} "
          "(replicas apply it at their next reconciliation)")
    if r.started:
        print(f"{r.started} started from the queue as the next canary")
    print("(if canary_rollout also asked in Airflow, its request now finds nothing pending when answered or timed out)")
    return 0


def _cmd_secrets_ensure(args) -> int:
    """Generate the missing secrets into --file (mode 0600); say where, never what."""
    from vloop.store.secretfile import STACK_SECRETS, ensure_secrets

    r = ensure_secrets(args.file, args.names or STACK_SECRETS)
    if r.generated:
        print(f"secrets: generated {', '.join(r.generated)} into {r.path} (mode 0600)")
    if r.reused:
        print(f"secrets: {', '.join(r.reused)} from {r.path}")
    if r.from_env:
        print(f"secrets: {', '.join(r.from_env)} from the environment")
    return 0


def _privacy_target(args):
    """(lake, user key) for a privacy command: ``--user`` is the raw id (hashed here with
    VLOOP_USER_KEY_SECRET, never stored), ``--user-key`` the stored key itself."""
    from vloop.store.config import ConfigError, load_settings
    from vloop.store.lake import open_lake
    from vloop.privacy import is_hmac_user_key, user_key

    s = load_settings()
    if getattr(args, "user_key", None) is not None:
        key = args.user_key.strip()
        if not is_hmac_user_key(key):
            # A shortened or mistyped key would name no one (or, matched loosely, someone else).
            raise ValueError(f"--user-key {key!r} is not a whole user key: it must be the 64 lowercase hex "
                             f"characters of HMAC-SHA256 that the gateway stores (this one has {len(key)}; logs "
                             f"print only the first 12). Copy it from the lake or `vloop privacy audit`, or "
                             f"pass --user with the raw id")
        if s.user_key_secret and key == user_key("", s.user_key_secret):
            raise ValueError("that is the shared key of requests without a user id")
    else:
        if not (args.user or "").strip():
            raise ValueError("--user is empty (requests without a user id share one key: erasing it would "
                             "erase every anonymous request)")
        if not s.user_key_secret:
            raise ConfigError("VLOOP_USER_KEY_SECRET is not set: it turns --user into the stored user key")
        key = user_key(args.user, s.user_key_secret)
        if key == user_key("", s.user_key_secret):
            raise ValueError("that is the shared key of requests without a user id")
    return open_lake(s.lake_url), key


def _label_studio_from_env():
    """A Label Studio client when LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set, else None."""
    import os

    from vloop.curate.labelstudio import LabelStudio

    url, token = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    return LabelStudio(url, token) if url and token else None


def _login() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "cli"


def _cmd_privacy_erase(args) -> int:
    import json

    from vloop.privacy.erasure import erase_user, request_erasure

    lake, key = _privacy_target(args)
    if args.queue:
        print(f"queued: {request_erasure(lake, key, actor=args.actor)} (the privacy_maintenance DAG erases it)")
        return 0
    ls = _label_studio_from_env()
    if ls is None and not args.no_label_studio:
        raise ValueError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so the user's tasks and annotations are "
                         "deleted too, or pass --no-label-studio where no Label Studio holds vloop's tasks")
    res = erase_user(lake, key, actor=args.actor, label_studio=ls)
    print(json.dumps(res.summary(), indent=2))
    return 0


def _cmd_privacy_opt_out(args) -> int:
    from vloop.privacy import read_opt_outs, record_opt_out, remove_opt_out

    if args.action == "list":
        from vloop.store.config import load_settings
        from vloop.store.lake import open_lake

        for k in sorted(read_opt_outs(open_lake(load_settings().lake_url))):
            print(k)
        return 0
    if not (args.user or args.user_key):
        raise ValueError(f"opt-out {args.action} needs --user or --user-key")
    lake, key = _privacy_target(args)
    if args.action == "add":
        new = record_opt_out(lake, key, actor=args.actor)
        print(f"{key}: {'opted out' if new else 'already opted out'}")
    else:
        was = remove_opt_out(lake, key, actor=args.actor)
        print(f"{key}: {'opted back in' if was else 'was not opted out'}")
    return 0


def _cmd_privacy_audit(args) -> int:
    import json

    from vloop.store.config import load_settings
    from vloop.store.lake import open_lake
    from vloop.privacy import audit_log

    for rec in audit_log(open_lake(load_settings().lake_url)):
        rest = {k: v for k, v in rec.items() if k not in ("at", "action", "actor")}
        print(f"{rec['at']}  {rec['action']:<20} {rec['actor']:<16} {json.dumps(rest, sort_keys=True)}")
    return 0


def _cmd_cold_start(args) -> int:
    from vloop.learn.coldstart import ColdStartConfig, cold_start
    from vloop.store.config import ConfigError, load_settings
    from vloop.store.lake import open_lake

    settings = load_settings()
    base = args.base_model or settings.base_model
    if not base:
        raise ConfigError("no base model: pass --base-model or set VLOOP_BASE_MODEL")
    lora = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v}
    cfg = ColdStartConfig(adapter_name=args.name, paraphrases=args.paraphrases, skip_bad_rows=args.skip_bad_rows,
                          work_dir=args.work_dir, lora=lora)
    r = cold_start(args.seed, lake=open_lake(args.url) if args.url else open_lake(), base_model=base, cfg=cfg,
                   settings=settings)
    print(f"{r.ref} registered as {r.status} (dataset {r.dataset_id}: {r.examples['train']} training examples "
          f"from {r.seed_rows} seed rows, {len(r.refused)} refused)")
    return 0


def _cmd_decoding(args) -> int:
    from vloop.vlm import decoding
    from vloop.store.lake import open_lake

    lake = open_lake(args.url) if args.url else open_lake()
    if args.decoding_command == "ban":
        p = decoding.ban(lake, args.phrases, actor=args.actor, reason=args.reason)
    elif args.decoding_command == "unban":
        p = decoding.unban(lake, args.phrases, actor=args.actor, reason=args.reason)
    else:
        p = decoding.current(lake)
    print(f"decoding policy version {p.version}" + (f" ({p.at}, {p.actor}: {p.reason})" if p.version else ""))
    print("banned: " + (", ".join(p.banned) or "nothing"))
    print("exceptions (allowed although they contain a banned phrase): " + (", ".join(p.exceptions) or "none"))
    return 0


def _cmd_golden_build(args) -> int:
    from vloop.learn.golden import GoldenConfig, build_golden, describe
    from vloop.store.lake import open_lake

    cfg = GoldenConfig(size=args.size, min_size=args.min_size, min_per_stratum=args.min_per_stratum,
                       since=args.since, until=args.until, seed=args.seed)
    record, golden = build_golden(open_lake(args.url) if args.url else open_lake(), cfg,
                                  new_version=args.new_version, actor=args.actor)
    print("\n".join(describe(record, golden)))
    print(f"in force from now on: retrain_biweekly's gate decides on v{record['version']}; its examples never "
          f"enter training" + (f" (nor those of v{record['replaces']}, kept)" if record.get("replaces") is not None
                               else ""))
    return 0


def _cmd_golden_show(args) -> int:
    from vloop.learn import golden as g
    from vloop.store.lake import open_lake

    lake = open_lake(args.url) if args.url else open_lake()
    cur = g.current(lake)
    if args.version is not None and (cur is None or args.version != cur["version"]):
        records = {r["version"]: r for r in g.versions(lake)}
        if args.version not in records:
            raise ValueError(f"no golden set version {args.version} (versions: "
                             f"{', '.join(f'v{v}' for v in sorted(records)) or 'none'})")
        record = records[args.version]
        print("\n".join(g.describe(record, g.load_version(lake, args.version))))
        return 0
    print("\n".join(g.describe(cur, g.load_version(lake) if cur else None)))
    older = [r for r in g.versions(lake) if cur is None or r["version"] != cur["version"]]
    for r in older:
        print(f"kept (held out of training): v{r['version']}, {r.get('size', '?')} examples, "
              f"{r.get('created_at', '?')}, {r.get('source', '?')}")
    return 0 if cur else 1


def _report_key(lake, day: str | None, loop: bool) -> str:
    """The lake key of DAY's daily report (``--loop``: the demo's loop report of the rounds that
    began on DAY); the newest one without DAY."""
    prefix = "reports/loop/" if loop else "reports/dt="
    if day is None:
        found = sorted(k for k in lake.list("reports/loop/" if loop else "reports/")
                       if k.startswith(prefix) and k.endswith("/index.html"))
        if not found:
            raise ValueError(f"no {'loop ' if loop else ''}report in {lake.url} yet")
        return found[-1]
    dt.date.fromisoformat(day)  # a ValueError naming the bad DAY
    key = f"{prefix}{day}/index.html"
    if not lake.exists(key):
        what = "the demo's loop report (vloop demo writes it)" if loop else "the report (feedback_daily's report task)"
        raise ValueError(f"no report at {key} in {lake.url}: {what} has not been written for {day}")
    return key


def _cmd_report(args) -> int:
    import datetime as _dt

    from vloop.store.lake import LocalLake, open_lake

    lake = open_lake(args.url) if args.url else open_lake()
    key = _report_key(lake, args.day, args.loop)
    expires = _dt.timedelta(hours=args.expires)
    if args.report_command == "url":
        # A local lake: the file itself; S3: a presigned https URL (valid --expires hours).
        print(lake.root / key if isinstance(lake, LocalLake) else lake.browser_url(key, expires))
        return 0
    import webbrowser

    url = lake.browser_url(key, expires)
    print(url)
    if not webbrowser.open(url):
        print("no browser could be started here: open the URL above", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args) -> int:
    from serving.cli import serve

    return serve(args)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vloop", description="Close the feedback loop around a deployed "
                                "vision-language model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("config", help="print the effective VLOOP_* settings (secrets masked)")
    c.set_defaults(fn=_cmd_config)

    lake = sub.add_parser("lake", help="inspect the lake")
    lsub = lake.add_subparsers(dest="lake_command", metavar="ACTION", required=True)
    ls = lsub.add_parser("ls", help="list keys under a prefix")
    ls.add_argument("prefix", nargs="?", default="")
    ls.set_defaults(fn=_cmd_lake_ls)
    chk = lsub.add_parser("check", help="write, read back and delete a probe object")
    chk.set_defaults(fn=_cmd_lake_check)
    chk.add_argument("--images", metavar="DAY", help="instead, re-verify the images DAY's interactions name "
                     "(present, bytes hashing to the key, decodable)")
    chk.add_argument("--repair", action="store_true", help="with --images: move bad lake copies to "
                     "quarantine/images/, so the next good copy a gateway ships replaces them")
    for q in (ls, chk):
        q.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")

    t = sub.add_parser("tiny-model", help="build the tiny Qwen3-VL (random init, local tokenizer)")
    t.add_argument("--out", required=True, help="directory to write the model to")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_cmd_tiny_model)

    pb = sub.add_parser("pretrain-base", help="train the tiny model into a mediocre champion (CPU, ~2 min)")
    pb.add_argument("--model", required=True, help="the tiny model directory (vloop tiny-model)")
    pb.add_argument("--out", required=True, help="directory for the trained base and eval.json")
    pb.add_argument("--steps", type=int, help="optimizer steps (default from PretrainConfig)")
    pb.add_argument("--seed", type=int, default=0)
    pb.set_defaults(fn=_cmd_pretrain_base)

    from serving.cli import add_arguments

    sv = add_arguments(sub.add_parser("serve", help="the model server + feedback gateway (python -m serving)"))
    sv.set_defaults(fn=_cmd_serve)

    ro = sub.add_parser("rollout", help="the live canary experiment: status, one look, rollback, "
                       "approve/reject a pending promotion")
    rsub = ro.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    rs = rsub.add_parser("status", help="per-arm counts, intervals, hours live, and what would be decided now")
    rs.set_defaults(fn=_cmd_rollout_status)
    rr = rsub.add_parser("rollback", help="take the canary off, or restore an earlier champion")
    rr.add_argument("--to", help="name@version (or 'base') to make the champion; default: end the canary, "
                    "or restore the previous champion when there is none")
    rr.add_argument("--reason", required=True, help="why (kept in the registry's history)")
    rr.set_defaults(fn=_cmd_rollout_rollback)
    rt = rsub.add_parser("step", help="one look now: decide and act (what the canary_rollout DAG runs hourly)")
    rt.set_defaults(fn=_cmd_rollout_step)
    rt.add_argument("--approval", choices=("auto", "manual"), default="auto",
                    help="manual: a promotion at the last stage waits for `vloop rollout approve` (as Variable "
                         "vloop_promotion_approval does in canary_rollout)")
    answers = []
    for verb, what in (("approve", "promote the canary whose promotion is pending (refused when none is)"),
                       ("reject", "roll back the canary whose promotion is pending, your name and comment the "
                                  "reason (refused when none is)")):
        q = rsub.add_parser(verb, help=what)
        q.add_argument("--comment", help="why (kept in the registry's history)")
        q.add_argument("--by", default=_login(), help="who answers (kept in the history; default: your login)")
        q.add_argument("--request", metavar="ID",
                       help="the request you looked at (`vloop rollout status` names it): refused if another one "
                            "is pending by then")
        q.set_defaults(fn=_cmd_rollout_answer)
        answers.append(q)
    for q in (rs, rr, rt, *answers):
        q.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")
    for q in (rs, rt):
        q.add_argument("--now", help="simulation mode only (VLOOP_SIMULATION=1): the simulated clock, ISO 8601")
    for q in (rr, rt):
        q.add_argument("--actor", default="cli", help="who acts (kept in the history)")

    se = sub.add_parser("secrets", help="the local stack's secrets file (what `make up` uses)")
    ssub = se.add_subparsers(dest="secrets_command", metavar="ACTION", required=True)
    sen = ssub.add_parser("ensure", help="generate missing secrets into a 0600 file; reuse the file's; the "
                          "environment wins")
    sen.add_argument("--file", required=True, help="the NAME=value file, e.g. $VLOOP_HOME/secrets.env")
    sen.add_argument("names", nargs="*", help="secret names (default: the stack's four)")
    sen.set_defaults(fn=_cmd_secrets_ensure)

    pv = sub.add_parser("privacy", help="erase a user, manage opt-outs, read the privacy audit log")
    psub = pv.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    pe = psub.add_parser("erase", help="remove a user's data from the lake and Label Studio (and keep it out)")
    po = psub.add_parser("opt-out", help="users whose requests are never logged, labelled or trained on")
    po.add_argument("action", choices=("add", "remove", "list"))
    for q in (pe, po):
        who = q.add_mutually_exclusive_group(required=q is pe)
        who.add_argument("--user", help="the raw user id (hashed with VLOOP_USER_KEY_SECRET; never stored)")
        who.add_argument("--user-key", help="the stored user key instead of the raw id: all 64 hex characters")
        q.add_argument("--actor", default=_login(), help="who acts (kept in the audit log; default: your login)")
    pe.add_argument("--queue", action="store_true", help="queue it for the privacy_maintenance DAG instead")
    pe.add_argument("--no-label-studio", action="store_true",
                    help="erase without reaching Label Studio (only where none holds vloop's tasks)")
    pe.set_defaults(fn=_cmd_privacy_erase)
    po.set_defaults(fn=_cmd_privacy_opt_out)
    psub.add_parser("audit", help="every privacy action: who, when, what, how much").set_defaults(fn=_cmd_privacy_audit)

    dc = sub.add_parser("decoding", help="the banned-phrase policy serving applies (hedges such as 可能, maybe)")
    dsub = dc.add_subparsers(dest="decoding_command", metavar="ACTION", required=True)
    db = dsub.add_parser("ban", help="add phrases (candidates: the daily report's phrases users delete)")
    du = dsub.add_parser("unban", help="remove phrases")
    dl = dsub.add_parser("list", help="the policy in force")
    for q in (db, du):
        q.add_argument("phrases", nargs="+")
        q.add_argument("--reason", required=True, help="why (kept in the policy's history)")
        q.add_argument("--actor", default="cli", help="who acts (kept in the history)")
    for q in (db, du, dl):
        q.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")
        q.set_defaults(fn=_cmd_decoding)

    cs = sub.add_parser("cold-start", help="the first adapter from an expert seed set (JSONL or CSV: image, "
                        "question, answer, category)")
    cs.add_argument("--seed", required=True, help="the seed file (.jsonl or .csv); image paths are relative to it")
    cs.add_argument("--base-model", help="base model directory or hub id (default: VLOOP_BASE_MODEL)")
    cs.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")
    cs.add_argument("--name", default="vqa", help="adapter name in the registry")
    cs.add_argument("--paraphrases", type=int, default=3, help="extra wordings per seed question")
    cs.add_argument("--steps", type=int, help="LoRA optimizer steps (default from LoraTrainConfig)")
    cs.add_argument("--batch-size", type=int, help="LoRA batch size (default from LoraTrainConfig)")
    cs.add_argument("--work-dir", default="var/training", help="local checkpoints and adapter files")
    cs.add_argument("--skip-bad-rows", action="store_true", help="train on the good rows and list the bad ones "
                    "(default: one bad row refuses the file)")
    cs.set_defaults(fn=_cmd_cold_start)

    gd = sub.add_parser("golden", help="the golden evaluation set the retraining gate decides on: build and "
                        "freeze it from annotators' labels, show it")
    gsub = gd.add_subparsers(dest="golden_command", metavar="ACTION", required=True)
    gb = gsub.add_parser("build", help="build, freeze and put in force a golden set from confirmed and corrected "
                         "labels, stratified by category and intent; refuses to replace the frozen one")
    gb.add_argument("--new-version", action="store_true", help="cut the next version and put it in force (the "
                    "earlier ones are kept, and stay out of training)")
    gb.add_argument("--size", type=int, default=200, help="examples wanted (default 200)")
    gb.add_argument("--min-size", type=int, default=50, help="refuse with fewer usable labels than this (default 50)")
    gb.add_argument("--min-per-stratum", type=int, default=5, help="at least this many per category and intent "
                    "(or all it has; default 5), the rest in proportion")
    gb.add_argument("--since", help="first day of labels, YYYY-MM-DD (default: all)")
    gb.add_argument("--until", help="last day of labels, YYYY-MM-DD (default: all)")
    gb.add_argument("--seed", type=int, default=0, help="which labels of a stratum are drawn")
    gb.add_argument("--actor", default=_login(), help="who builds it (kept in its record; default: your login)")
    gb.set_defaults(fn=_cmd_golden_build)
    gs = gsub.add_parser("show", help="the golden set in force: version, size, coverage per category and intent; "
                         "the versions kept")
    gs.add_argument("--version", type=int, help="show this version instead")
    gs.set_defaults(fn=_cmd_golden_show)
    for q in (gb, gs):
        q.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")

    rp = sub.add_parser("report", help="where a day's report is (a file, or a presigned URL on S3), or open it")
    rpsub = rp.add_subparsers(dest="report_command", metavar="ACTION", required=True)
    ru = rpsub.add_parser("url", help="print the report's location: a file path for a local lake, a presigned "
                          "URL for an S3 lake")
    rop = rpsub.add_parser("open", help="open the report in a browser")
    for q in (ru, rop):
        q.add_argument("day", nargs="?", metavar="DAY", help="YYYY-MM-DD (default: the newest report)")
        q.add_argument("--loop", action="store_true", help="the demo's loop report (reports/loop/DAY/) instead of "
                       "the daily one")
        q.add_argument("--expires", type=float, default=24, help="hours a presigned URL stays valid (default 24)")
        q.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")
        q.set_defaults(fn=_cmd_report)

    d = sub.add_parser("demo", help="the whole loop on real services, simulated users (what `make demo` runs)")
    # Defaults: vloop.sim.demo_loop.LoopConfig's (not imported here: `vloop --help` stays fast).
    d.add_argument("--rounds", type=_positive_int, help="rounds of label → retrain → canary → promote (default 2)")
    d.add_argument("--keep", action="store_true", help="leave Label Studio and serving running afterwards")
    d.add_argument("--users-per-day", type=_positive_int,
                   help="simulated shoppers a day, two questions each, of a user base of 600 (default 250)")
    d.add_argument("--label-days", type=_positive_int,
                   help="simulated days of traffic and labelling before each retraining (default 1)")
    d.add_argument("--seed", type=int, help="the simulation's seed (default 0)")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vloop.store.config import ConfigError
    from vloop.store.images import ImageError
    from vloop.store.lake import LakeError

    try:
        return args.fn(args)
    except (ConfigError, LakeError, ImageError, ValueError) as e:  # RegistryError is a ValueError  # model and input errors are ValueErrors
        print(f"vloop {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
