#!/usr/bin/env bash
# The GPU path's first run: one script, under 8 minutes on one H100 or H200, that checks
# what no CPU run can and writes its figures as a section of benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default runs/gpu_check
#
# Parts (each under `timeout`, within one time budget, so one failure or hang does not
# stop the rest; each leaves logs/<part>.log in OUT_DIR):
#   te_bf16, te_fp8  the tiny model (examples/configs/tiny.yaml) with transformer-engine's
#                    specs, 20 steps in bf16 and in fp8 (hybrid, delayed scaling): the loss
#                    falls; fp8's loss after 20 steps within 2 % of bf16's
#   distopt          the same bf16 run with parallel.use_distributed_optimizer=true on 1
#                    GPU: its losses against the plain optimizer's
#   packed           p-MoD's tiny config (examples/configs/pmod/tiny.yaml) with
#                    data.packing=true, TE specs, bf16, 20 steps: packed rows' attention
#                    (SDPA per sample, PackedSeqParams, beside TE's layers) and MoD's per-sample
#                    top-k on the GPU; the loss falls, data/padding_fraction reported
#   dali             DALI `mixed` (nvJPEG) decode + CLIP preprocessing of the tiny data
#                    set's images against the CPU paths (Pillow, DALI CPU): max and mean
#                    pixel difference
#   generate         the bf16 run's checkpoint opened by `megamod generate`'s code: every
#                    parameter on the GPU, tokens generated
#   convert          `megamod convert` megamod -> HF -> megamod -> HF (the CLI picks its
#                    device): the two HF exports bit-identical; and its adapters on the
#                    GPU with TE's tensor names: the checkpoint in a model built here ->
#                    `to_hf` == the CLI's export, and that export -> `from_hf` ->
#                    `module_names` -> the same model -> `to_hf` == it again
#   step             benchmarks/run.py's default ~1B shape (CLIP ViT-L/336, 576 vision
#                    tokens; 16 x 2048 decoder; bf16), dense and MoD: dense MFU, MoD's step
#                    time against dense
# Then OUT_DIR/RESULTS-gpu.md: the section to paste into benchmarks/RESULTS.md (also
# printed).
#
# The GPU machine needs torch with CUDA; it needs no package index. megamod and its
# dependencies, transformer-engine and DALI among them, install from wheels in
# benchmarks/gpu_wheels/ (or $GPU_CHECK_WHEELS) unless they already import. Fill that
# folder beforehand, on a machine with the index and the GPU machine's Python version and
# platform (x86_64 Linux, CPython 3.11):
#   pip download --dest benchmarks/gpu_wheels ".[gpu]"
#       # megamod's dependencies with the `gpu` extra (transformer-engine[pytorch],
#       # nvidia-dali-cuda120); torch and its nvidia-* wheels may be deleted from the folder
#       # when the GPU machine has them
#   pip wheel --no-deps --no-build-isolation --wheel-dir benchmarks/gpu_wheels \
#       "transformer-engine-torch==$(ls benchmarks/gpu_wheels | sed -n 's/^transformer_engine_cu12-\([^-]*\)-.*/\1/p')"
#       # TE's torch extension is published as source only: build its wheel once against
#       # the GPU machine's torch and CUDA (a CUDA toolkit with nvcc; ~15 minutes), e.g. on
#       # that machine or in a matching CUDA devel container
#
# Environment: GPU_CHECK_BUDGET (seconds for all parts, default 450: 7.5 minutes),
# GPU_CHECK_PARTS (the parts to run, e.g. "te_bf16 generate"; default all), PYTHON
# (default python).

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
OUT=$(realpath -m "${1:-$REPO/runs/gpu_check}")
WHEELS=${GPU_CHECK_WHEELS:-$HERE/gpu_wheels}
BUDGET=${GPU_CHECK_BUDGET:-450}
PARTS=${GPU_CHECK_PARTS:-setup te_bf16 te_fp8 distopt packed dali generate convert step}
PY=${PYTHON:-python}
TINY=examples/configs/tiny.yaml
# The tiny runs: 20 steps, nothing written but what a part needs.
TINY_RUN=(train.train_iters=20 logging.log_interval=1 logging.tensorboard_dir=null
          checkpoint.save_dir=null checkpoint.save_interval=null)
export OUT PY TINY

cd "$REPO" || exit 1
mkdir -p "$OUT/logs" "$OUT/parts"
# A fresh start: an earlier run's checkpoint would be resumed (or judged) instead.
rm -rf "$OUT"/parts/* "$OUT"/logs/* "$OUT/tiny_bf16" "$OUT/convert"

seconds_left() { echo $((BUDGET - SECONDS)); }

# part NAME CAP_SECONDS COMMAND...: COMMAND under `timeout` (its cap or the time left,
# whichever is less), output to logs/NAME.log, its outcome to parts/NAME.status.
part() {
    local name=$1 cap=$2 left
    shift 2
    if [[ " $PARTS " != *" $name "* ]]; then
        echo "not selected (GPU_CHECK_PARTS)" >"$OUT/parts/$name.status"
        return
    fi
    left=$(seconds_left)
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        echo "not run: the ${BUDGET} s budget was spent" >"$OUT/parts/$name.status"
        return
    fi
    local start=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start)) status
    case $rc in
        0) status="ok" ;;
        124 | 137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc; logs/$name.log)" ;;
    esac
    echo "$status, ${took} s" >"$OUT/parts/$name.status"
    echo "[gpu_check] $name: $status, ${took} s" >&2
}

# ------------------------------------------------------------------------- set-up

setup() {
    if "$PY" -c "import megamod, megatron.core, transformer_engine.pytorch, nvidia.dali" 2>/dev/null; then
        echo "megamod, megatron-core, transformer-engine and DALI already import: nothing to install"
        return 0
    fi
    if [[ ! -d $WHEELS ]]; then
        echo "no wheel folder $WHEELS (see the head of benchmarks/gpu_check.sh): installing nothing"
        return 1
    fi
    # From the folder only; the torch already there satisfies megamod's requirement.
    "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e ".[gpu]"
}
export -f setup
export WHEELS
part setup 120 bash -c setup
"$PY" - "$OUT/parts/environment.json" <<'PY' 2>>"$OUT/logs/setup.log"
import json, subprocess, sys
import torch
env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
       "torch": torch.__version__, "cuda": torch.version.cuda}
for name, module in (("transformer_engine", "transformer_engine"), ("dali", "nvidia.dali"),
                     ("megatron_core", "megatron.core")):
    try:
        env[name] = __import__(module, fromlist=["__version__"]).__version__
    except Exception as e:  # reported, not fatal: the parts that need it fail on their own
        env[name] = f"not importable ({type(e).__name__})"
try:
    from megamod.models.specs import transformer_engine_available
    env["te_specs"] = transformer_engine_available()
except Exception as e:
    env["te_specs"] = f"megamod not importable ({type(e).__name__})"
try:
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True, check=True).stdout.strip()
except Exception:
    env["commit"] = "unknown"
json.dump(env, open(sys.argv[1], "w"))
PY

# ------------------------------------------------- tiny runs and DALI, side by side
# Five small jobs share the GPU at once (each a few hundred MiB): their numbers do not
# depend on it, and the budget would not hold them one after another.

dali_check() {
    "$PY" - "$OUT/parts/dali.json" <<'PY'
"""DALI on the GPU ("mixed": nvJPEG decode, GPU resize) against the CPU paths, on the
tiny data set's images (JPEG and PNG, up to 512 px) at 336 px, both aspect modes."""
import json, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from megamod.data.decode import DaliImageDecoder, PythonImageDecoder
from megamod.data.tiny import write_tiny_dataset

with tempfile.TemporaryDirectory() as tmp:
    images = [(p.name, p.read_bytes())
              for p in sorted(Path(write_tiny_dataset(tmp)).parent.rglob("*")) if p.suffix in (".jpg", ".png")]
result = {"images": len(images), "size": 336}
with ThreadPoolExecutor(4) as pool:
    for aspect in ("pad", "resize"):
        pillow = PythonImageDecoder(336, aspect, pool)
        reference, _ = pillow(images)
        cpu, _ = DaliImageDecoder(336, aspect, num_threads=4, fallback=pillow)(images)
        mixed, errors = DaliImageDecoder(336, aspect, num_threads=4, fallback=pillow,
                                         device_id=torch.cuda.current_device())(images)
        assert not errors, errors
        for name, other in (("pillow", reference), ("dali_cpu", cpu)):
            diff = np.abs(mixed - other)
            result[f"{aspect}_mixed_vs_{name}"] = {"max": float(diff.max()), "mean": float(diff.mean())}
json.dump(result, open(sys.argv[1], "w"))
print(json.dumps(result))
PY
}
export -f dali_check

part te_bf16 200 "$PY" -m megamod train "$TINY" "${TINY_RUN[@]}" precision.params_dtype=bf16 \
    checkpoint.save_dir="$OUT/tiny_bf16" checkpoint.save_interval=20 &
part te_fp8 200 "$PY" -m megamod train "$TINY" "${TINY_RUN[@]}" precision.params_dtype=bf16 \
    precision.fp8=hybrid &
part distopt 200 "$PY" -m megamod train "$TINY" "${TINY_RUN[@]}" precision.params_dtype=bf16 \
    parallel.use_distributed_optimizer=true &
part packed 200 "$PY" -m megamod train examples/configs/pmod/tiny.yaml "${TINY_RUN[@]}" \
    precision.params_dtype=bf16 data.packing=true &
part dali 200 bash -c dali_check &
wait

# ------------------------------------------------------- the tools on the GPU

generate_check() {
    "$PY" - "$OUT/tiny_bf16" "$OUT/parts/generate.json" <<'PY'
"""What `megamod generate` runs (open_generator -> prompt_tokens -> generate), on the bf16
run's checkpoint: where the model's tensors are, and the answer."""
import json, sys, tempfile, time
from pathlib import Path

from megamod.data.tiny import write_tiny_dataset
from megamod.inference.generate import open_generator, prompt_tokens

with tempfile.TemporaryDirectory() as tmp:
    image = sorted(Path(write_tiny_dataset(tmp)).parent.rglob("*.jpg"))[0]
    with open_generator(sys.argv[1]) as generator:
        model = generator.model
        devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
        ids, pixels = prompt_tokens(generator, "What is in the image?", [image])
        start = time.perf_counter()
        result = generator.generate([ids], pixels, 8)
        seconds = time.perf_counter() - start
        text = generator.tokenizer.decode(result.tokens[0], skip_special_tokens=True)
report = {"devices": devices, "new_tokens": len(result.tokens[0]), "seconds": seconds, "text": text}
json.dump(report, open(sys.argv[2], "w"))
print(json.dumps(report))
PY
}
export -f generate_check

convert_check() {
    # The user's path: the CLI, megamod -> HF -> megamod -> HF (it picks its own device).
    local c=("$PY" -m megamod convert --force) rc=0
    "${c[@]}" --from megamod --to hf --input "$OUT/tiny_bf16" --output "$OUT/convert/hf" || return 1
    "${c[@]}" --from hf --to megamod --input "$OUT/convert/hf" --output "$OUT/convert/megamod" &&
        "${c[@]}" --from megamod --to hf --input "$OUT/convert/megamod" --output "$OUT/convert/hf_again" ||
        rc=1
    # The adapters on the GPU: the checkpoint in a model built here (TE's specs, CUDA) ->
    # to_hf -> the CLI's export; that export -> from_hf -> the same model -> to_hf again.
    "$PY" - "$OUT/tiny_bf16" "$OUT/convert" "$OUT/parts/convert.json" <<'PY' || rc=1
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from megamod.convert.hf import from_hf, module_names, to_hf
from megamod.data.tokenizer import load_tokenizer
from megamod.models.build import build_model, one_process_config
from megamod.parallel import world_of_one
from megamod.training.checkpoint import load_model_weights, saved_config, tokenizer_of


def differing(a, b):
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b
                  or not torch.equal(a[k].cpu(), b[k].cpu()))


ckpt, root = Path(sys.argv[1]), Path(sys.argv[2])
export = load_file(root / "hf" / "model.safetensors")
report = {"tensors": len(export)}
if (root / "hf_again" / "model.safetensors").exists():
    report["cli_round_trip_differ"] = differing(export, load_file(root / "hf_again" / "model.safetensors"))[:5]
saved = saved_config(ckpt)
tokenizer = load_tokenizer(tokenizer_of(ckpt, saved))
config = one_process_config(saved, tokenizer.vocab_size)
with world_of_one(config.parallel, config.train.seed, "gpu_check"):
    model = build_model(config, tokenizer)
    load_model_weights(ckpt, model)
    own = model.state_dict()
    report["devices"] = sorted({str(t.device) for t in own.values() if torch.is_tensor(t)})
    report["te_names"] = any(".layer_norm_weight" in k for k in own)
    image_id = tokenizer.image_token_id
    report["gpu_export_differ"] = differing(to_hf(own, config, image_id)[0], export)[:5]
    state, _ = from_hf(export, json.loads((root / "hf" / "config.json").read_text()))
    extra = {k: v for k, v in own.items() if k.endswith("_extra_state")}
    model.load_state_dict({**extra, **module_names(state, own.keys())}, strict=True)
    report["gpu_reimport_differ"] = differing(to_hf(model.state_dict(), config, image_id)[0], export)[:5]
report["identical"] = not any(report.get(k) for k in
                              ("cli_round_trip_differ", "gpu_export_differ", "gpu_reimport_differ"))
json.dump(report, open(sys.argv[3], "w"))
print(json.dumps(report))
PY
    return $rc
}
export -f convert_check

if [[ -f $OUT/tiny_bf16/latest_checkpointed_iteration.txt ]]; then
    part generate 90 bash -c generate_check
    part convert 150 bash -c convert_check
else
    for name in generate convert; do
        echo "not run: te_bf16 saved no checkpoint" >"$OUT/parts/$name.status"
    done
fi

# ------------------------------------------------ the ~1B step: MFU, MoD vs dense
# run.py's default shape and its own measurement (median of 5 steps after 2 warm-up);
# no loader or generation figures here.
part step 300 "$PY" benchmarks/run.py --variants dense,mod --steps 5 --warmup 2 \
    --loader-steps 0 --generation-tokens 0 --json

# ------------------------------------------------------------------------- report

"$PY" - "$OUT" <<'PY'
"""OUT/RESULTS-gpu.md from the parts' logs and JSON: a section in RESULTS.md's format."""
import datetime, json, sys
from pathlib import Path

out = Path(sys.argv[1])


def status(name):
    path = out / "parts" / f"{name}.status"
    return path.read_text().strip() if path.exists() else "not run"


def part_json(name):
    path = out / "parts" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def logged(name, key):
    """`key` by iteration from a `megamod train` log's JSON lines."""
    path = out / "logs" / f"{name}.log"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(l) for l in lines if l.startswith('{"iteration"')]
    return [r[key] for r in records if key in r]


def losses(name):
    return logged(name, "train/loss")


def verdict(ok):
    return "pass" if ok else "**FAIL**"


env = part_json("environment") or {}
rows = []  # (check, figure, target, result)
bf16, fp8, distopt = losses("te_bf16"), losses("te_fp8"), losses("distopt")
for name, run in (("bf16", bf16), ("fp8 (hybrid, delayed scaling)", fp8)):
    part = "te_bf16" if name == "bf16" else "te_fp8"
    if len(run) >= 20:
        rows.append((f"tiny, TE specs, {name}: loss at steps 1 -> 20", f"{run[0]:.3f} -> {run[19]:.3f}",
                     "falls", verdict(run[19] < run[0])))
    else:
        rows.append((f"tiny, TE specs, {name}: loss at steps 1 -> 20", f"{len(run)} steps logged",
                     "falls", f"**{status(part)}**"))
packed = losses("packed")
if len(packed) >= 20:
    padding = logged("packed", "data/padding_fraction")
    figure = f"{packed[0]:.3f} -> {packed[19]:.3f}" + (
        f"; padding {sum(padding) / len(padding):.1%} of the rows' positions" if padding else "")
    rows.append(("p-MoD tiny, TE specs, packed rows, bf16: loss at steps 1 -> 20", figure, "falls",
                 verdict(packed[19] < packed[0])))
else:
    rows.append(("p-MoD tiny, TE specs, packed rows, bf16: loss at steps 1 -> 20",
                 f"{len(packed)} steps logged", "falls", f"**{status('packed')}**"))
if len(bf16) >= 20 and len(fp8) >= 20:
    gap = abs(fp8[19] - bf16[19]) / bf16[19]
    rows.append(("fp8 vs bf16: loss after 20 steps", f"{gap:.2%} apart", "<= 2 %", verdict(gap <= 0.02)))
if len(bf16) >= 20 and len(distopt) >= 20:
    gap = max(abs(d - b) / b for d, b in zip(distopt, bf16))
    rows.append(("distributed optimizer vs plain, 1 GPU, bf16: loss over 20 steps",
                 f"at most {gap:.3%} apart", "<= 0.5 %", verdict(gap <= 0.005)))
else:
    missing = "te_bf16" if len(bf16) < 20 else "distopt"
    rows.append(("distributed optimizer vs plain, 1 GPU, bf16", f"{missing}: {len(losses(missing))} steps",
                 "<= 0.5 %", f"**{missing} {status(missing)}**"))
dali = part_json("dali")
if dali:
    for aspect in ("pad", "resize"):
        for other in ("pillow", "dali_cpu"):
            d = dali[f"{aspect}_mixed_vs_{other}"]
            figure = f"{d['max']:.4f} / {d['mean']:.5f}"
            what = (f"DALI mixed vs {other.replace('_', ' ')}, {dali['images']} images, 336 px "
                    f"{aspect}: max / mean pixel difference (normalised)")
            if other == "pillow":
                # The reference. Pillow's and DALI's bicubic kernels differ: tests/data/
                # test_dali.py allows DALI CPU 1.5x its measured max at 336 px (0.071 pad,
                # 0.105 resize); nvJPEG's decode may add a little to that.
                target = {"pad": 0.107, "resize": 0.158}[aspect]
                rows.append((what, figure, f"max <= {target}", verdict(d["max"] <= target)))
            else:  # decoders (nvJPEG, libjpeg-turbo) and resize kernels: measured only
                rows.append((what, figure, "-", "measured"))
else:
    rows.append(("DALI mixed vs CPU decode", "-", "-", f"**{status('dali')}**"))
generated = part_json("generate")
if generated:
    on_gpu = generated["devices"] and all(d.startswith("cuda") for d in generated["devices"])
    rows.append(("generate on CUDA: devices of the model's tensors; up to 8 new tokens",
                 f"{', '.join(generated['devices'])}; {generated['new_tokens']} tokens in "
                 f"{generated['seconds']:.2f} s", "all cuda", verdict(on_gpu)))
else:
    rows.append(("generate on CUDA", "-", "all cuda", f"**{status('generate')}**"))
converted = part_json("convert")
if converted:
    cli = converted.get("cli_round_trip_differ")
    rows.append(("convert, the CLI: megamod -> HF -> megamod -> HF", f"{converted['tensors']} tensors, "
                 + ("not run to the end" if cli is None else "bit-identical" if not cli else f"differ: {cli}"),
                 "bit-identical", verdict(cli == [])))
    rows.append((f"convert's adapters on {', '.join(converted['devices'])}, TE names: "
                 f"{converted['te_names']}: to_hf, and from_hf back into the model",
                 "bit-identical to the CLI's export" if not converted["gpu_export_differ"]
                 and not converted["gpu_reimport_differ"] else
                 f"differ: {converted['gpu_export_differ'] + converted['gpu_reimport_differ']}",
                 "bit-identical", verdict(not converted["gpu_export_differ"]
                                          and not converted["gpu_reimport_differ"])))
else:
    rows.append(("convert on CUDA: megamod -> HF -> megamod", "-", "bit-identical",
                 f"**{status('convert')}**"))

step_log = out / "logs" / "step.log"
summary = None
if step_log.exists():
    last = [l for l in step_log.read_text().splitlines() if l.startswith("{")]
    summary = json.loads(last[-1]) if last else None
step_rows = []
if summary:
    variants, ratios = summary["variants"], summary["ratios"]
    dense = variants["dense"]
    for name, r in variants.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        memory = f"{r['step_memory_gib']:.1f}" if "step_memory_gib" in r else "-"
        step_rows.append(
            f"| {name} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops_per_step']:.2f} | "
            f"{r['tflops_per_s']:.1f} | {mfu} | {memory} | {r['step_time_s'] / dense['step_time_s']:.3f} | "
            f"{r['tflops_per_step'] / dense['tflops_per_step']:.3f} |")
    if "mfu" in dense:
        rows.append(("dense MFU, ~1B shape (of the bf16 tensor-core peak)", f"{dense['mfu']:.1%}", "-",
                     "measured"))
    if "ratio_mod_vs_dense" in ratios:
        rows.append(("MoD vs dense step time, 576 vision tokens", f"{ratios['ratio_mod_vs_dense']:.3f} "
                     f"(FLOPs {ratios['flops_ratio']:.3f})", "<= 0.65 (the CPU target)", "measured"))
else:
    rows.append(("dense MFU and MoD vs dense, ~1B shape", "-", "-", f"**{status('step')}**"))

date = datetime.date.today().isoformat()
lines = [
    f"## GPU check (`benchmarks/gpu_check.sh`), {date}", "",
    f"{env.get('device', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), "
    f"transformer-engine {env.get('transformer_engine', '?')} (TE specs: {env.get('te_specs', '?')}), "
    f"DALI {env.get('dali', '?')}, megatron-core {env.get('megatron_core', '?')}; commit "
    f"{env.get('commit', '?')}.", "",
    "```bash", "bash benchmarks/gpu_check.sh", "```", "",
    "| check | figure | target | result |", "|---|---|---|---|",
    *[f"| {' | '.join(row)} |" for row in rows], "",
]
if step_rows:
    lines += [
        f"The ~1B step (`benchmarks/run.py`, default shape, {summary['dtype']}; median of "
        f"{summary['steps']} after {summary['warmup']} warm-up):", "",
        "| variant | step (s) | tokens/s | TFLOP/step | TFLOP/s | MFU | step GiB | step time vs dense "
        "| FLOPs vs dense |", "|---|---|---|---|---|---|---|---|---|", *step_rows, "",
    ]
lines += ["Parts: " + "; ".join(f"{name} {status(name)}" for name in
                                ("setup", "te_bf16", "te_fp8", "distopt", "packed", "dali", "generate",
                                 "convert", "step")), ""]
report = "\n".join(lines)
(out / "RESULTS-gpu.md").write_text(report)
print(report)
PY
