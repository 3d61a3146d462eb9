"""Retraining benchmark: stage wall times at 1k and 10k logged completions, selection over 1M,
and training tokens/s of loopchat's trainer against a bare TRL run of the same config.

Each size gets a fresh SQLite database under .data/bench/retrain/ filled with synthetic logged
completions (about half rated, one in ten corrected, one in twenty in a side-by-side pair),
then one retraining run is timed stage by stage: selection (MiniLM embeddings, budget
min(n/5, 2000)), dataset build, SFT training (`--train-steps` steps, batch 8, 128 tokens), and the
held-out evaluation of candidate and champion. The 1M scenario times selection alone.

Training throughput: `retrain.train.train_adapter` and a bare `trl.SFTTrainer` built by hand with
the same hyperparameters, dataset and LoRA, alternating (`--rounds` of each), in this process;
tokens/s = non-padding input tokens seen / train runtime; ratio = median(ours) / median(bare),
target >= 0.95.

Ratings-to-lift curve (`curve`): for two simulated populations (retrain/populations.py), one
turn of `loopchat simulate` on a fresh server and database after 25, 50, 100 and 200 ratings
(as many users before the run, each rating one answer; `--curve-after-users` per canary round
after it), training as the simulation's defaults decide; the lift is the candidate's rate of the
trait minus the control's, with its always-valid interval.

Results: a table on the console and bench/results/retrain.{json,md}.

Usage: .venv/bin/python -m bench.retrain [--sizes 1000 10000] [--selection-size 1000000]
       [--train-steps 10] [--rounds 2] [--curve-populations facts minority_thumbs]
       [--curve-ratings 25 50 100 200] [--only stages|selection|throughput|curve]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from feedback.db import make_engine, migrate
from feedback.models import Completion, Conversation, Preference, Rating
from retrain.config import GateConfig, RetrainConfig, SelectionConfig, TrainingConfig
from retrain.dataset import build_dataset
from retrain.gate import gate, score
from retrain.select import select_samples
from retrain.train import train_adapter

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "bench" / "results"
WORK = REPO / ".data" / "bench" / "retrain"
MODEL = REPO / ".data" / "models" / "SmolLM2-135M-Instruct"
TARGET_RATIO = 0.95
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "mountain",
    "coffee",
    "garden",
    "planet",
    "window",
    "music",
    "paper",
    "stone",
    "light",
    "winter",
    "summer",
    "city",
    "ocean",
    "forest",
    "bridge",
]


def fill(url: str, n: int, seed: int = 0, chunk: int = 20_000) -> None:
    """`n` synthetic logged completions with ratings, corrections and side-by-side pairs."""
    rng = random.Random(seed)
    engine = make_engine(url)
    now = dt.datetime.now(dt.UTC)
    done = 0
    while done < n:
        size = min(chunk, n - done)
        conversations, completions, ratings, preferences = [], [], [], []
        for i in range(done, done + size):
            cid, conv = f"chatcmpl-{uuid.uuid4().hex}", f"conv-{uuid.uuid4().hex}"
            topic = " ".join(rng.choices(WORDS, k=4))
            prompt = [{"role": "user", "content": f"Tell me about {topic} ({i % 5000})."}]
            answer = (
                f"{topic.capitalize()} is interesting because " + " ".join(rng.choices(WORDS, k=12)) + "."
            )
            conversations.append(
                {"id": conv, "user_key": f"u{i % 997}", "created_at": now, "last_active_at": now}
            )
            completions.append(
                {
                    "id": cid,
                    "conversation_id": conv,
                    "user_key": f"u{i % 997}",
                    "created_at": now,
                    "model_version": "base",
                    "experiment": "",
                    "variant": "",
                    "messages": prompt,
                    "prompt_hash": f"h{i % 5000}",
                    "response": answer,
                    "sampling": {},
                    "latency_ms": 100.0,
                    "logprob_mean": -rng.random() * 2,
                    "logprob_min": -3.0,
                    "redacted": True,
                }
            )
            roll = rng.random()
            if roll < 0.5:
                up = rng.random() < 0.6
                ratings.append(
                    {
                        "completion_id": cid,
                        "user_key": f"u{i % 997}",
                        "thumb": "up" if up else "down",
                        "correction": f"A better answer about {topic}." if roll < 0.1 else None,
                        "tags": [],
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            if roll > 0.95 and completions[-2:-1]:
                other = completions[-2]["id"]
                preferences.append(
                    {
                        "pair_key": "|".join(sorted((cid, other))),
                        "chosen_completion_id": cid,
                        "rejected_completion_id": other,
                        "user_key": "u",
                        "created_at": now,
                        "updated_at": now,
                    }
                )
        with engine.begin() as connection:
            connection.execute(Conversation.__table__.insert(), conversations)
            connection.execute(Completion.__table__.insert(), completions)
            if ratings:
                connection.execute(Rating.__table__.insert(), ratings)
            if preferences:
                connection.execute(Preference.__table__.insert(), preferences)
        done += size
    engine.dispose()


def fresh_db(name: str) -> str:
    path = WORK / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{path}"
    migrate(url)
    return url


def training_config(steps: int) -> TrainingConfig:
    return TrainingConfig(
        max_steps=steps,
        learning_rate=2e-4,
        batch_size=8,
        max_length=128,
        lora_r=16,
        lora_alpha=32,
        early_stopping_patience=0,
    )


def stage_times(n: int, steps: int) -> dict[str, Any]:
    url = fresh_db(f"stages-{n}")
    started = time.perf_counter()
    fill(url, n)
    filled = time.perf_counter() - started
    engine = make_engine(url)
    config = RetrainConfig(
        selection=SelectionConfig(budget=min(max(n // 5, 1), 2000)),
        gate=GateConfig(f1_examples=4, max_new_tokens=16),
    )
    times: dict[str, float] = {}
    started = time.perf_counter()
    selection = select_samples(engine, config.selection)
    times["selection"] = time.perf_counter() - started
    started = time.perf_counter()
    manifest = build_dataset(engine, {c.completion_id for c in selection.picked}, WORK / f"datasets-{n}")
    times["dataset"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trained = train_adapter("sft", manifest, MODEL, Path(scratch) / "adapter", training_config(steps))
        times["training"] = time.perf_counter() - started
        started = time.perf_counter()
        result = gate(
            score(MODEL, trained.adapter_dir, manifest, config.gate),
            score(MODEL, None, manifest, config.gate),
            config.gate,
        )
        times["evaluation"] = time.perf_counter() - started
    engine.dispose()
    return {
        "logged": n,
        "fill_seconds": round(filled, 1),
        "candidates": selection.candidates,
        "selected": len(selection.picked),
        "sft_examples": manifest.counts["sft"],
        "test_examples": manifest.size("sft", "test"),
        "train_steps": steps,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "gate_passed": result.passed,
    }


def selection_at_scale(n: int) -> dict[str, Any]:
    url = fresh_db(f"selection-{n}")
    started = time.perf_counter()
    fill(url, n)
    filled = time.perf_counter() - started
    engine = make_engine(url)
    started = time.perf_counter()
    selection = select_samples(engine, SelectionConfig(budget=2000))
    seconds = time.perf_counter() - started
    engine.dispose()
    return {
        "logged": n,
        "fill_seconds": round(filled, 1),
        "candidates": selection.candidates,
        "selected": len(selection.picked),
        "duplicates": selection.duplicates,
        "selection_seconds": round(seconds, 2),
    }


def bare_trl_tokens_per_second(manifest, config: TrainingConfig) -> float:
    """The same run, built by hand on TRL: SFTTrainer + LoraConfig, no loopchat code."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    data = load_dataset("json", data_files=str(manifest.file("sft", "train")), split="train").remove_columns(
        ["source"]
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            max_length=config.max_length,
            bf16=False,
            report_to="none",
            logging_steps=1,
            include_num_input_tokens_seen="non_padding",
            save_strategy="no",
            seed=config.seed,
            completion_only_loss=True,
        )
        peft = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft
        )
        started = time.perf_counter()
        trainer.train()
        return trainer.state.num_input_tokens_seen / (time.perf_counter() - started)


def throughput(steps: int, rounds: int) -> dict[str, Any]:
    url = fresh_db("throughput")
    fill(url, 3000)
    engine = make_engine(url)
    selection = select_samples(engine, SelectionConfig(budget=1000, embed=False))
    picked = {c.completion_id for c in selection.picked}
    manifest = build_dataset(engine, picked, WORK / "datasets-throughput")
    engine.dispose()
    # No validation, as in the bare run: only the training loop is compared.
    config = training_config(steps)
    plain = _without_validation(manifest)
    ours, bare = [], []

    def run_ours() -> None:
        with tempfile.TemporaryDirectory() as scratch:
            ours.append(train_adapter("sft", plain, MODEL, Path(scratch) / "a", config).tokens_per_second)

    def run_bare() -> None:
        bare.append(bare_trl_tokens_per_second(manifest, config))

    for index in range(rounds):
        # Alternate which goes first: the second run of a pair inherits the first one's heap.
        for run in (run_bare, run_ours) if index % 2 == 0 else (run_ours, run_bare):
            gc.collect()
            run()
    ratio = statistics.median(ours) / statistics.median(bare)
    return {
        "steps": steps,
        "rounds": rounds,
        "ours": [round(x, 1) for x in ours],
        "bare": [round(x, 1) for x in bare],
        "ratio": round(ratio, 3),
        "pass": ratio >= TARGET_RATIO,
    }


def _without_validation(manifest):
    from dataclasses import replace

    counts = {fmt: {**split, "validation": 0} for fmt, split in manifest.counts.items()}
    return replace(manifest, counts=counts)


def lift_curve(populations: list[str], points: list[int], after_users: int) -> list[dict[str, Any]]:
    """One simulated turn per population and number of ratings (see the module docstring)."""
    import shutil

    from retrain.simulate import run_simulation

    rows = []
    for name in populations:
        for ratings in points:
            work = WORK / f"curve-{name}-{ratings}"
            shutil.rmtree(work, ignore_errors=True)
            started = time.perf_counter()
            report = run_simulation(
                name, work, users=ratings, max_ratings=ratings, after_users=after_users, base_model=MODEL
            )
            turn = report.turns[0]
            test = turn.test()
            row = {
                "population": name,
                "ratings": ratings,
                "method": turn.run.get("method"),
                "status": turn.run.get("status"),
                "before": round(turn.before.rate(), 3),
                "candidate": round(turn.after.rate("candidate"), 3),
                "control": round(turn.after.rate("control"), 3),
                "answers": dict(turn.after.by_variant),
                "lift": None if test.difference is None else round(test.difference, 3),
                "interval": None if test.interval is None else [round(x, 3) for x in test.interval],
                "decision": turn.decision.get("action"),
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            print(json.dumps(row))
            shutil.rmtree(work, ignore_errors=True)
    return rows


def machine() -> dict[str, Any]:
    import torch
    import trl

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "git": commit.strip(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--selection-size", type=int, default=1_000_000)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--curve-populations", nargs="+", default=["facts", "minority_thumbs"])
    parser.add_argument("--curve-ratings", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--curve-after-users", type=int, default=48)
    parser.add_argument(
        "--only",
        choices=("stages", "selection", "throughput", "curve"),
        help="run one part, keep the others' results",
    )
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        print(f"no model at {MODEL}: run `make model` first")
        return 1
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    previous = json.loads((OUT / "retrain.json").read_text()) if (OUT / "retrain.json").is_file() else {}
    if args.only in (None, "stages"):
        results["stages"] = []
        for n in args.sizes:
            print(f"== stages at {n} logged completions")
            results["stages"].append(stage_times(n, args.train_steps))
            print(json.dumps(results["stages"][-1]))
    if args.only in (None, "selection"):
        print(f"== selection over {args.selection_size} logged completions")
        results["selection"] = selection_at_scale(args.selection_size)
        print(json.dumps(results["selection"]))
    if args.only in (None, "throughput"):
        print("== training tokens/s, loopchat vs bare TRL")
        results["throughput"] = throughput(args.train_steps, args.rounds)
        print(json.dumps(results["throughput"]))
    if args.only in (None, "curve"):
        print(f"== ratings-to-lift curve: {args.curve_populations} after {args.curve_ratings} ratings")
        measured = lift_curve(args.curve_populations, args.curve_ratings, args.curve_after_users)
        for row in measured:
            row["date"] = results["date"]
        # Points not run this time keep their earlier rows (each row says when it was measured).
        done = {(row["population"], row["ratings"]) for row in measured}
        kept = [
            {"date": previous["date"], **row}
            for row in previous.get("curve", [])
            if (row["population"], row["ratings"]) not in done
        ]
        results["curve"] = sorted(kept + measured, key=lambda row: (row["population"], row["ratings"]))
    for part in ("stages", "selection", "throughput", "curve"):
        if part in results:
            continue
        if part not in previous:
            print(f"no earlier {part} results to keep: run without --only first")
            return 1
        results[part] = previous[part]
        results.setdefault("kept_from", {})[part] = previous.get("kept_from", {}).get(part, previous["date"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "retrain.json").write_text(json.dumps(results, indent=2))
    (OUT / "retrain.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Retraining benchmark",
        "",
        f"- date: {results['date']}; {m['cpus']} CPUs; torch {m['torch']}; trl {m['trl']}; git {m['git']}",
        "- synthetic log: about half rated (60% up), 10% corrected, 5% in side-by-side pairs",
        "",
        "| logged | candidates | selected | SFT train/val/test | selection s | dataset s "
        "| training s (steps) | evaluation s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["stages"]:
        s, sft = row["seconds"], row["sft_examples"]
        lines.append(
            f"| {row['logged']} | {row['candidates']} | {row['selected']} | "
            f"{sft['train']}/{sft['validation']}/"
            f"{sft['test']} | {s['selection']} | {s['dataset']} | {s['training']} ({row['train_steps']}) | "
            f"{s['evaluation']} |"
        )
    if results.get("kept_from"):
        lines.append("")
    for part, date in results.get("kept_from", {}).items():
        lines.append(f"- {part}: figures from the run of {date} (this run measured the rest)")
    sel = results["selection"]
    t = results["throughput"]
    lines += [
        "",
        f"Selection over {sel['logged']} logged completions ({sel['candidates']} candidates, budget 2000): "
        f"{sel['selection_seconds']} s.",
        "",
        f"Training tokens/s, loopchat / bare TRL (median of {t['rounds']}, {t['steps']} steps each): "
        f"{statistics.median(t['ours']):.0f} / {statistics.median(t['bare']):.0f} = {t['ratio']} "
        f"({'PASS' if t['pass'] else 'FAIL'} against >= {TARGET_RATIO}); "
        f"rounds ours {t['ours']}, bare {t['bare']}.",
        "",
    ]
    lines += curve_markdown(results["curve"])
    return "\n".join(lines)


def curve_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Ratings-to-lift curve: one simulated turn per point (`loopchat simulate` defaults, fresh server "
        "and database); lift = candidate's rate of the trait - control's, always-valid 95 % interval.",
        "",
        "| population | ratings | method | before | candidate | control | lift [interval] | decision | s "
        "| measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        answers = r["answers"]
        lift = "-"
        if r["lift"] is not None:
            low, high = r["interval"]
            lift = f"{r['lift']:+.2f} [{low:+.2f}, {high:+.2f}]"
        lines.append(
            f"| {r['population']} | {r['ratings']} | {r['method']} ({r['status']}) | {r['before']:.2f} | "
            f"{r['candidate']:.2f} ({answers.get('candidate', 0)}) | {r['control']:.2f} "
            f"({answers.get('control', 0)}) | {lift} | {r['decision']} | {r['seconds']:.0f} | "
            f"{r.get('date', '')[:10]} |"
        )
    return [*lines, ""]


if __name__ == "__main__":
    raise SystemExit(main())
