"""Rows, goals, plots, profile and notes of ``fleetloop bench weights`` from its measured runs
(``runs[size]["fleetloop"|"raw_grpc"][robots]``, see :mod:`bench.weights`)."""

from __future__ import annotations

from typing import Any

from bench.common import median, ratio, row


def rows_goals_plots(results: dict[str, dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    rows, goals, plots = [], [], {}
    sizes = [s for s in results if results[s]["fleetloop"]]
    for s in sizes:
        fl, raw = results[s]["fleetloop"], results[s]["raw_grpc"]
        for n in sorted(map(int, fl)):
            f, r = fl[str(n)], raw[str(n)]
            rows += [row(f"{s} MB: publish -> all verified, median", "s", n, f["delivery_median_s"], r["delivery_median_s"],
                         "lower", "raw: transfer only"),
                     row(f"{s} MB: announce -> all verified, median", "s", n, _after_publish(f),
                         r["delivery_plus_sha256_median_s"], "lower",
                         "without the publish (sha256 || fsync'd write); raw: transfer + the client's sha256 after it"),
                     row(f"{s} MB: publish -> running on every robot, P50", "s", n, f["running_median_s"],
                         r["delivery_median_s"], "lower", "running = installed in the policy the robot acts with"),
                     row(f"{s} MB: publish -> running on every robot, P99", "s", n, f["running_p99_s"], r["delivery_p99_s"],
                         "lower", "raw: P99 of transfer"),
                     row(f"{s} MB: delivery rate per robot, median", "MB/s", n, f["mb_per_s_median"], r["mb_per_s_median"],
                         "higher"),
                     row(f"{s} MB: serving process CPU per round, median", "CPU-s", n, f["learner_cpu_median_s"],
                         r["server_cpu_median_s"], "lower", "learner process, incl. the publish (sha256, the kernel's share of "
                         "the durable write), vs the raw server in the same process"),
                     row(f"{s} MB: receiving CPU per round (all robots), median", "CPU-s", n, f["robots_cpu_median_s"],
                         r["clients_cpu_median_s"], "lower", "robots: fetch, sha256, parse, install, one action"),
                     row(f"{s} MB: peak RSS per receiving process", "MB", n, f["robot_rss_peak_mb"], r["client_rss_peak_mb"],
                         "lower", "robot: policy + one fetched buffer; raw: the chunks only")]
        if "1" in fl:
            one = ratio(fl["1"]["delivery_median_s"], raw["1"]["delivery_median_s"])
            goals.append(_goal(f"weight delivery to 1 actor <= 1.3x raw gRPC ({s} MB)", 1.3, one, "ratio",
                               _limit_one(s, fl["1"], raw["1"])))
        top = max(map(int, fl))
        if top > 1 and "1" in fl:
            fl_ratio = ratio(fl[str(top)]["delivery_median_s"], fl["1"]["delivery_median_s"])
            raw_ratio = ratio(raw[str(top)]["delivery_median_s"], raw["1"]["delivery_median_s"])
            rows.append(row(f"{s} MB: {top}-actor time / 1-actor time", "x", f"{top}/1", fl_ratio, raw_ratio, "lower"))
            goals.append(_goal(f"delivery to {top} actors <= 2x the 1-actor time ({s} MB)", 2.0, fl_ratio, "ratio",
                               _limit_fanout(s, top, fl, raw)))
    big = max(sizes, key=float) if sizes else None
    if big is not None:
        top = max(map(int, results[big]["fleetloop"]))
        f = results[big]["fleetloop"][str(top)]
        one = results[big]["fleetloop"].get("1")
        goals.append(_goal(f"{big} MB to every robot ({top} robots) P99 < 5 s on loopback", 5.0, f["running_p99_s"], "s",
                           f"stages (median s): {_stages(f)}. The download is CPU-bound: {top} robots and the learner share "
                           f"the machine's cores ({f['robots_cpu_median_s']:.1f} CPU-s of robots + {f['learner_cpu_median_s']:.1f} "
                           f"of the learner per round; raw gRPC alone takes {results[big]['raw_grpc'][str(top)]['delivery_median_s']:.2f} s "
                           f"for {top} clients)" + (f"; 1 robot: P99 {one['running_p99_s']:.2f} s" if one else "")
                           + "; the publish's fsync'd write varies with the disk (publish_write_fsync in the rounds)"))
    per_robot, every_robot = {}, {}
    for s in sizes:  # renderer convention: a plot named *cdf holds raw samples per series
        top = max(map(int, results[s]["fleetloop"]))
        f = results[s]["fleetloop"][str(top)]
        per_robot[f"{s} MB, {top} robots"] = f["per_robot_running_samples_s"]
        every_robot[f"{s} MB, {top} robots"] = f["running_samples_s"]
    plots["running_per_robot_latency_cdf"] = {"series": per_robot, "xlabel": "publish -> running on one robot (s)",
                                              "ylabel": "fraction of robot installs"}
    plots["running_every_robot_latency_cdf"] = {"series": every_robot, "xlabel": "publish -> running on every robot (s)",
                                                "ylabel": "fraction of versions"}
    xs = [float(s) for s in sizes]
    series = {}
    for n in counts:
        if all(str(n) in results[s]["fleetloop"] for s in sizes):
            series[f"fleetloop, {n} robots"] = [results[s]["fleetloop"][str(n)]["delivery_median_s"] for s in sizes]
            series[f"raw gRPC, {n} clients"] = [results[s]["raw_grpc"][str(n)]["delivery_median_s"] for s in sizes]
    plots["delivery_vs_size"] = {"x": xs, "series": series, "xlabel": "policy size (MB)",
                                 "ylabel": "publish -> all verified, median (s)", "ylog": True}
    fan: dict[str, list] = {}
    for s in sizes:
        for who, key in (("fleetloop", "fleetloop"), ("raw gRPC", "raw_grpc")):
            fan[f"{who}, {s} MB"] = [results[s][key][str(n)]["delivery_median_s"] if str(n) in results[s][key] else None
                                     for n in counts]
    plots["delivery_vs_fanout"] = {"x": counts, "series": fan, "xlabel": "robots (fan-out)",
                                   "ylabel": "publish -> all verified, median (s)", "ylog": True}
    out: dict[str, Any] = {"rows": rows, "goals": goals, "plots": plots}
    if big is not None:
        top = max(map(int, results[big]["fleetloop"]))
        f = results[big]["fleetloop"][str(top)]
        total = f["running_median_s"]
        stages = _stage_values(f)
        out["profile"] = {"what": f"stage breakdown of publish -> running, {big} MB x {top} robots (median s per stage, "
                                  f"share of the median total); CPU-seconds per round: learner process "
                                  f"{f['learner_cpu_median_s']:.2f}, all robots {f['robots_cpu_median_s']:.2f}",
                          "top": [[k, v, v / total if total else None] for k, v in stages]}
    return out


def _after_publish(f: dict[str, Any]) -> float | None:
    """Median over timed rounds of publish -> all verified minus the publish call."""
    return median([r["delivery_s"] - r["publish_s"] for r in f["rounds"] if not r["warmup"]])


def _goal(goal: str, target: float, measured: float | None, unit: str, limit: str) -> dict[str, Any]:
    met = measured is not None and measured <= target
    return {"goal": goal, "target": target, "measured": measured, "unit": unit, "met": met,
            "limit": "" if met else limit}


def _stage_values(f: dict[str, Any]) -> list[tuple[str, float]]:
    return [("publish: sha256 || fsync'd write (learner)", f["publish_median_s"]),
            ("announce -> last robot notified", f["announce_median_s"]),
            ("announcement -> fetch starts (robot thread hand-off)", f["handoff_median_s"]),
            ("download: FetchWeights stream, sha256 on the way", f["download_median_s"]),
            ("verify: digest compare + safetensors header parse (views)", f["verify_median_s"]),
            ("wait for the episode boundary", f["boundary_wait_median_s"]),
            ("install: PolicyRunner.load (load_state_dict copy)", f["install_median_s"])]


def _stages(f: dict[str, Any]) -> str:
    return "; ".join(f"{k} {v:.3f}" for k, v in _stage_values(f))


def _limit_one(s: str, f: dict[str, Any], r: dict[str, Any]) -> str:
    return (f"{s} MB, 1 robot: publish {f['publish_median_s']:.3f} s (sha256 || fsync'd write; raw has no publish) + "
            f"download {f['download_median_s']:.3f} s (vs raw transfer {r['delivery_median_s']:.3f} s; raw + client sha256 "
            f"{r['delivery_plus_sha256_median_s']:.3f} s) + verify {f['verify_median_s']:.3f} s; announce -> verified alone is "
            f"{ratio(_after_publish(f), r['delivery_plus_sha256_median_s']):.2f}x raw transfer + the client's sha256. The digest "
            f"and durable write "
            f"are required (invariant 4); what would close the rest: announce before the fsync completes (weakens durability "
            f"before announce) or stream the blob while it is being hashed (needs the digest at the end, a proto change).")


def _limit_fanout(s: str, top: int, fl: dict[str, Any], raw: dict[str, Any]) -> str:
    f1, fn, rn = fl["1"], fl[str(top)], raw[str(top)]
    return (f"{s} MB: raw gRPC itself scales {ratio(rn['delivery_median_s'], raw['1']['delivery_median_s']):.2f}x from 1 to "
            f"{top} clients on this machine: every receiver copies (and fleetloop also hashes) every byte, so {top} receivers "
            f"need ~{top}x the CPU of one on the machine's cores. Per round: learner process {fn['learner_cpu_median_s']:.2f} "
            f"CPU-s (1 robot: {f1['learner_cpu_median_s']:.2f}), robots {fn['robots_cpu_median_s']:.2f} CPU-s (1 robot: "
            f"{f1['robots_cpu_median_s']:.2f}), learner bytes served {fn['learner_served_copies_median']:.1f} copies of the "
            f"blob. Where the learner's egress (not the receivers) is the limit, peer fetch or a relay (designed in "
            f"docs/notes/weights-fanout.md, not implemented) would cut the copies it serves.")


def notes(results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for s, per in results.items():
        spec = per["spec"]
        for n, f in sorted(per["fleetloop"].items(), key=lambda kv: int(kv[0])):
            r = per["raw_grpc"][n]
            out.append(f"{s} MB (MLP width {spec['kwargs']['hidden'][0]}, {spec['params'] * 4:,} bytes of parameters), "
                         f"{n} robot(s), medians: {_stages(f)}; first action after install {f['first_action_median_s']:.3f} s; "
                         f"learner served {f['learner_served_copies_median']:.2f} copies; raw transfer {r['delivery_median_s']:.3f} s, "
                         f"+ client sha256 {r['delivery_plus_sha256_median_s']:.3f} s")
    out.append("P99 over rounds uses linear interpolation: with few rounds it is close to the maximum")
    return out


def before_after_notes(ba: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per before/after comparison (:func:`bench.weights_rounds.measure_before_after`)."""
    big = max(results, key=float)
    out = []
    for n, legacy in ba.get("client_path", {}).items():
        after = results[big]["fleetloop"].get(n)
        if after is None:
            continue
        b = legacy["legacy"]
        out.append(f"before/after, {big} MB x {n} robot(s), robot fetch path (legacy: join, then sha256, then "
                   f"safetensors.torch.load -> streaming: sha256 on arrival, zero-copy views): publish -> all verified "
                   f"{b['delivery_median_s']:.3f} -> {after['delivery_median_s']:.3f} s; download {b['download_median_s']:.3f} -> "
                   f"{after['download_median_s']:.3f} s (streaming hashes during the download); verify+load {b['verify_median_s']:.3f} -> "
                   f"{after['verify_median_s']:.3f} s; download+verify {b['download_median_s'] + b['verify_median_s']:.3f} -> "
                   f"{after['download_median_s'] + after['verify_median_s']:.3f} s; "
                   f"robot peak RSS {b['robot_rss_peak_mb']:.0f} -> {after['robot_rss_peak_mb']:.0f} MB")
    if "publish" in ba:
        p = ba["publish"]
        sha = p.get("sha256_median_s")
        if sha is None:  # an earlier run's section: take the sha256 time the fleetloop rounds measured
            sha = median([f.get("publish_sha256_median_s") for f in results[big]["fleetloop"].values()
                          if f.get("publish_sha256_median_s") is not None])
        out.append(f"before/after, {big} MB publish: sha256 then fsync'd write {p['sequential_median_s']:.3f} s -> both at "
                   f"once (WeightStore.publish) {p['parallel_median_s']:.3f} s (samples: {[round(x, 2) for x in p['sequential_s']]} "
                   f"vs {[round(x, 2) for x in p['parallel_s']]}). The change itself saves at most the sha256 time ({sha:.3f} s): the fsync'd "
                   f"write alone varies by seconds with the disk's state (see publish_write_fsync in the rounds), and "
                   f"that variance, not the change, is most of the difference between the two medians")
    if "serving_cpu_per_copy" in ba:
        c = ba["serving_cpu_per_copy"]
        out.append(f"before/after, {big} MB: CPU to encode every FetchWeights chunk once (per robot served): "
                   f"{c['previous_s']:.3f} s (message with a bytes copy, serialized) -> {c['one_copy_s']:.3f} s "
                   f"(learner.weight_serving, one copy)")
    return out
