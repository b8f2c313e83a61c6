#!/usr/bin/env bash
# ModelOpt's examples/hf_ptq/scripts/huggingface_example.sh command line, run by `qtool quantize`.
#
# Contract: accepts ModelOpt's flags (--flag VALUE or --flag=VALUE):
#   --model --quant --kv_cache_quant --calib --calib_dataset --calib_seq --calib_batch_size
#   --awq_block_size --output --gpu, plus --force/--json passed through;
#   --tp --pp --tasks --batch --trust_remote_code --sparsity --no-verbose … are accepted and ignored
#   with a note (qtool writes a Hugging Face checkpoint; engine build and evaluation are not its job).
# It maps ModelOpt's format names onto qtool recipes (fp8, fp8_pc_pt → fp8-rowwise,
# fp8_pb_wo → fp8-block, nvfp4, mxfp4, int4_awq → w4a16-awq, w4a8_awq → w4a8-awq,
# int4_gptq → w4a16-gptq, w4a8_gptq; 0.47 preset basenames too) and runs `qtool quantize`, so
#   scripts/huggingface_example.sh --model <card> --quant fp8 --kv_cache_quant nvfp4
# works as written. An unmapped name exits 2 with one line. Defaults follow ModelOpt's script:
# --calib 512, --calib_seq 512, --kv_cache_quant fp8 (calibrated; fp8_cast/nvfp4_cast map to the
# calibrated fp8/nvfp4), --model smollm2-135m (qtool's built-in), output saved_models_<model>_<quant>_kv_<kv>.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

MODEL=smollm2-135m; QUANT=fp8; KV=fp8; CALIB=512; CALIB_SEQ=512; BATCH=0; AWQ_BLOCK=""; OUTPUT=""
DATASET=""; GPU=""; EXTRA=()

die() { echo "error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  arg=$1; shift
  case "$arg" in
    --*=*) val=${arg#*=}; arg=${arg%%=*} ;;
    --force|--json|--no-verbose|--trust_remote_code|--use_seq_device_map|--low_memory_mode|--vlm) val="" ;;
    --*) [ $# -gt 0 ] || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument '$arg' (ModelOpt flags look like --model X)" ;;
  esac
  case "$arg" in
    --model) MODEL=$val ;;
    --quant) QUANT=$val ;;
    --kv_cache_quant) KV=$val ;;
    --calib) CALIB=${val%%,*} ;;
    --calib_seq) CALIB_SEQ=$val ;;
    --calib_batch_size) BATCH=$val ;;
    --calib_dataset|--dataset) DATASET=$val ;;
    --awq_block_size) AWQ_BLOCK=$val ;;
    --output|--export_path) OUTPUT=$val ;;
    --gpu) GPU=$val ;;
    --force|--json) EXTRA+=("$arg") ;;
    --tp|--pp|--tasks|--batch|--sparsity|--lm_eval_tasks|--lm_eval_limit|--simple_eval_tasks|--simple_eval_limit|\
    --mmlu_limit|--gpu_max_mem_percentage|--kv_cache_free_gpu_memory_fraction|--auto_quantize_bits|--input|\
    --trust_remote_code|--no-verbose|--use_seq_device_map|--low_memory_mode|--vlm|--build_max_input_len)
      echo "note: $arg is ignored (qtool writes a Hugging Face checkpoint; no engine build or evaluation)" >&2 ;;
    --recipe) die "--recipe (ModelOpt YAML recipes) is not supported; use --quant and --kv_cache_quant" ;;
    *) die "unknown flag $arg" ;;
  esac
done

case "$QUANT" in
  fp8) Q=fp8 ;;
  fp8_pc_pt|fp8_per_channel_per_token|fp8_rowwise) Q=fp8-rowwise ;;
  fp8_pb_wo|fp8_2d_blockwise_weight_only|fp8_block) Q=fp8-block ;;
  nvfp4) Q=nvfp4 ;;
  mxfp4) Q=mxfp4 ;;
  int4_awq|w4a16_awq) Q=w4a16-awq ;;
  w4a8_awq|w4a8_awq_beta) Q=w4a8-awq ;;
  int4_gptq|w4a16_gptq) Q=w4a16-gptq ;;
  w4a8_gptq) Q=w4a8-gptq ;;
  *) die "--quant $QUANT has no qtool recipe; use one of fp8, fp8_pc_pt, fp8_pb_wo, nvfp4, mxfp4, int4_awq, w4a8_awq, int4_gptq, w4a8_gptq" ;;
esac
case "$KV" in
  none|fp8|nvfp4) K=$KV ;;
  fp8_cast) K=fp8; echo "note: fp8_cast → fp8 (qtool calibrates k/v scales instead of a constant amax)" >&2 ;;
  nvfp4_cast) K=nvfp4; echo "note: nvfp4_cast → nvfp4 (calibrated k/v scales)" >&2 ;;
  *) die "--kv_cache_quant $KV has no qtool recipe; use none, fp8 or nvfp4" ;;
esac
if [ -n "$DATASET" ] && [ ! -e "${DATASET%%,*}" ]; then
  die "--calib_dataset '$DATASET' is not a local file or folder (qtool calibrates offline: give a .txt, .jsonl or a folder of them)"
fi
if [ -z "$OUTPUT" ]; then
  OUTPUT="saved_models_$(basename "${MODEL%/}")_${QUANT}_kv_${KV}"
fi

ARGS=(quantize --model "$MODEL" --quant "$Q" --kv-cache-quant "$K" --calib-size "$CALIB"
      --calib-seq-len "$CALIB_SEQ" --batch-size "$BATCH" --output "$OUTPUT")
[ -n "$AWQ_BLOCK" ] && ARGS+=(--awq-block-size "$AWQ_BLOCK")
[ -n "$DATASET" ] && ARGS+=(--calib-data "${DATASET%%,*}")
[ -n "$GPU" ] && ARGS+=(--gpu "$GPU")
ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

echo "+ qtool ${ARGS[*]}" >&2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m qtool "${ARGS[@]}"
