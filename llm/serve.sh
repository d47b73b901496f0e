#!/usr/bin/env bash
# Host the retrospective model -- a base model plus zero or more LoRA adapters, each addressable by name -- behind
# an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models).
#
#   SERVE_MODEL=runs/tiny/lm SERVE_ADAPTERS="sft=runs/demo/sft,ppo=runs/demo/ppo" llm/serve.sh
#
# Then point a reflector at it: reflector.llm: {backend: openai, base_url: http://127.0.0.1:8000/v1, model: sft}.
#
# Backends:
#   vllm          vLLM's OpenAI server with `--enable-lora --lora-modules name=path ...`, run by $SERVE_VLLM_PYTHON:
#                 the serving environment .venv-serve (`make serve-venv`: vLLM's CPU build, whose pins clash with
#                 the training stack's) when it exists, else $PYTHON when it imports vllm (a GPU install). The base
#                 answers as $SERVE_BASE_NAME, each adapter under its own name.
#   transformers  `transformers serve` (CPU fallback). It loads no LoRA adapters, so each adapter is merged into a
#                 full copy of the base (cached under $SERVE_CACHE_DIR, reused while base and adapter are unchanged)
#                 and the server runs in a folder of links named base / <adapter names>: a request for model "sft"
#                 loads the merged SFT copy. All named models are loaded before the script reports ready.
#
# Variables (read from the environment, then from $SERVE_ENV_FILE; the environment wins):
#   SERVE_MODEL          base model: local folder or hub id                  (default: runs/tiny/lm)
#   SERVE_ADAPTERS       comma-separated name=path LoRA adapters             (default: none)
#   SERVE_BASE_NAME      model name the base answers to                      (default: base)
#   SERVE_HOST           listen address                                      (default: 127.0.0.1)
#   SERVE_PORT           listen port                                         (default: 8000)
#   SERVE_DTYPE          auto, float32, bfloat16 or float16                  (default: auto)
#   SERVE_BACKEND        auto, vllm or transformers                          (default: auto: vllm if importable)
#   SERVE_VLLM_PYTHON    interpreter that runs vLLM                          (default: .venv-serve/bin/python if
#                                                                            present, else $PYTHON)
#   SERVE_MAX_LORA_RANK  vllm: largest LoRA rank among the adapters          (default: 16)
#   SERVE_CACHE_DIR      merged adapter copies and the names folder          (default: runs/serve_cache)
#   SERVE_READY_TIMEOUT  seconds to wait for the server and its models      (default: 300)
#   SERVE_EXTRA_ARGS     extra arguments for the server, split on spaces     (default: none)
#   SERVE_API_KEY        key every request must send (Authorization: Bearer) (default: none; set it for a SERVE_HOST
#                        other than loopback, and give the reflector's llm.api_key_env the variable holding it)
#   SERVE_ENV_FILE       file of VAR=value lines; only the variables listed   (default: .env at the repository root)
#                        here are read from it
#   PYTHON               interpreter with retroformer installed             (default: .venv/bin/python, else python3)
#
# A request for a model name that is not served answers 404 and one without a model 400, in OpenAI's error format;
# GET /v1/models/{id} answers as OpenAI's does (transformers backend). It prints "ready: <base URL> models: <names>"
# once the server answers, and stops the server (and waits for it) on SIGINT or SIGTERM. Relative paths are relative
# to the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) echo "serve.sh: unknown argument '$1'; configure it with the SERVE_* variables (see --help)" >&2; exit 2 ;;
esac

VARS=(SERVE_MODEL SERVE_ADAPTERS SERVE_BASE_NAME SERVE_HOST SERVE_PORT SERVE_DTYPE SERVE_BACKEND SERVE_CACHE_DIR
      SERVE_READY_TIMEOUT SERVE_EXTRA_ARGS SERVE_API_KEY PYTHON)
VARS+=(SERVE_VLLM_PYTHON SERVE_MAX_LORA_RANK VLLM_CPU_KVCACHE_SPACE)
ENV_FILE="${SERVE_ENV_FILE:-$ROOT/.env}"
if [[ -f "$ENV_FILE" ]]; then
    # Only the variables above are read from the file, and none is exported: the other secrets of .env (API keys of
    # other services) stay out of the model server's environment. The process environment wins. Nothing is echoed.
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line#"${line%%[![:space:]]*}"}"
        line="${line#export }"
        [[ -z "$line" || "$line" == \#* || "$line" != *=* ]] && continue
        name="${line%%=*}"
        value="${line#*=}"
        for v in "${VARS[@]}"; do
            if [[ "$name" == "$v" && -z "${!v+x}" ]]; then
                if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then value="${BASH_REMATCH[1]}"; fi
                printf -v "$v" '%s' "$value"
            fi
        done
    done <"$ENV_FILE"
fi

MODEL="${SERVE_MODEL:-runs/tiny/lm}"
ADAPTERS="${SERVE_ADAPTERS:-}"
BASE_NAME="${SERVE_BASE_NAME:-base}"
HOST="${SERVE_HOST:-127.0.0.1}"
PORT="${SERVE_PORT:-8000}"
DTYPE="${SERVE_DTYPE:-auto}"
BACKEND="${SERVE_BACKEND:-auto}"
CACHE_DIR="${SERVE_CACHE_DIR:-runs/serve_cache}"
READY_TIMEOUT="${SERVE_READY_TIMEOUT:-300}"
read -r -a EXTRA <<<"${SERVE_EXTRA_ARGS:-}"

PY="${PYTHON:-.venv/bin/python}"
if ! command -v "$PY" >/dev/null 2>&1; then
    PY="python3"
fi
PY="$(command -v "$PY")"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"

if [[ ! "$PORT" =~ ^[0-9]+$ ]]; then
    echo "serve.sh: SERVE_PORT='$PORT' is not a port number; set e.g. SERVE_PORT=8000" >&2
    exit 2
fi
if [[ ! "$READY_TIMEOUT" =~ ^[0-9]+$ ]]; then
    echo "serve.sh: SERVE_READY_TIMEOUT='$READY_TIMEOUT' is not a number of seconds; set e.g. 300" >&2
    exit 2
fi
case "$HOST" in
    127.* | localhost | ::1) ;;
    *)
        if [[ -z "${SERVE_API_KEY:-}" ]]; then
            echo "serve.sh: warning: SERVE_HOST=$HOST accepts requests from other machines and SERVE_API_KEY is not" \
                "set, so anyone who reaches it can use the model; set SERVE_API_KEY or serve on 127.0.0.1" >&2
        fi
        ;;
esac
if [[ -n "${SERVE_API_KEY:-}" ]]; then
    export SERVE_API_KEY # the server and the readiness check need it; it is never put on a command line
fi
# --- backend selection ---------------------------------------------------------------------------------------------
# vLLM lives in its own environment (its CPU build needs an older transformers than training does): .venv-serve,
# made by `make serve-venv`. Finding the module is enough to choose it; importing vllm takes seconds.
VLLM_PY="${SERVE_VLLM_PYTHON:-}"
if [[ -z "$VLLM_PY" ]]; then
    if [[ -x "$ROOT/.venv-serve/bin/python" ]]; then VLLM_PY="$ROOT/.venv-serve/bin/python"; else VLLM_PY="$PY"; fi
fi
has_vllm() {
    "$VLLM_PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' >/dev/null 2>&1
}
if [[ "$BACKEND" == auto ]]; then
    if has_vllm; then BACKEND=vllm; else BACKEND=transformers; fi
elif [[ "$BACKEND" == vllm ]] && ! has_vllm; then
    echo "serve.sh: SERVE_BACKEND=vllm, but '$VLLM_PY' cannot import vllm; create the serving environment with" \
        "\`make serve-venv\` (CPU), install vllm beside \$PYTHON (GPU), or point SERVE_VLLM_PYTHON at a Python" \
        "that has it" >&2
    exit 2
fi
MAX_LORA_RANK="${SERVE_MAX_LORA_RANK:-16}"
if [[ ! "$MAX_LORA_RANK" =~ ^[0-9]+$ ]]; then
    echo "serve.sh: SERVE_MAX_LORA_RANK='$MAX_LORA_RANK' is not a number; set the largest adapter rank, e.g. 16" >&2
    exit 2
fi

CHILD=""
stop() {
    trap - INT TERM EXIT
    if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then
        echo "serve.sh: stopping the server (pid $CHILD)" >&2
        kill -TERM "$CHILD" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$CHILD" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$CHILD" 2>/dev/null; then
            echo "serve.sh: the server did not stop within 10 s; killing it" >&2
            kill -KILL "$CHILD" 2>/dev/null || true
        fi
        wait "$CHILD" 2>/dev/null || true
    fi
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop' EXIT

URL="http://$HOST:$PORT/v1"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

case "$BACKEND" in
    vllm)
        LORA=()
        NAMES=("$BASE_NAME")
        if [[ -n "$ADAPTERS" ]]; then
            LORA=(--enable-lora --max-lora-rank "$MAX_LORA_RANK" --lora-modules)
            IFS=',' read -r -a PAIRS <<<"$ADAPTERS"
            for pair in "${PAIRS[@]}"; do
                pair="${pair#"${pair%%[![:space:]]*}"}"  # trim spaces, as in "sft=a, ppo=b"
                pair="${pair%"${pair##*[![:space:]]}"}"
                [[ -z "$pair" ]] && continue
                if [[ "$pair" != ?*=?* ]]; then
                    echo "serve.sh: SERVE_ADAPTERS entry '$pair' is not name=path; write e.g. sft=runs/demo/sft" >&2
                    exit 2
                fi
                LORA+=("$pair")
                NAMES+=("${pair%%=*}")
            done
        fi
        # The module, not the `vllm` command: that one looks up a distribution named vllm, and the CPU build's is
        # vllm-cpu. The KV cache of the CPU build is plain memory, in GiB (ignored on a GPU).
        export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
        VLLM_API_KEY="${SERVE_API_KEY:-}" "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
            --served-model-name "$BASE_NAME" --host "$HOST" --port "$PORT" --dtype "$DTYPE" "${LORA[@]}" "${EXTRA[@]}" &
        CHILD=$!
        LOAD=()
        ;;
    transformers)
        NAMES_DIR="$CACHE_DIR/names-$PORT"
        # A plain assignment, so that a failed merge stops the script (set -e).
        SERVED="$("$PY" -m retroformer.serving prepare --model "$MODEL" --adapters "$ADAPTERS" \
            --cache-dir "$CACHE_DIR" --names-dir "$NAMES_DIR" --base-name "$BASE_NAME" --dtype "$DTYPE")"
        read -r -a NAMES <<<"$SERVED"
        # The server resolves a request's model name as a path from its working directory: the names folder. The
        # guard in front of it answers 404 for other names (and checks SERVE_API_KEY when it is set).
        (cd "$NAMES_DIR" && exec "$PY" -m retroformer.serving serve --names "${NAMES[@]}" -- --host "$HOST" \
            --port "$PORT" --device cpu --dtype "$DTYPE" --model-timeout -1 "${EXTRA[@]}") &
        CHILD=$!
        LOAD=()
        for n in "${NAMES[@]}"; do LOAD+=(--load "$n"); done
        ;;
    *)
        echo "serve.sh: SERVE_BACKEND='$BACKEND' is not auto, vllm or transformers" >&2
        exit 2
        ;;
esac

"$PY" -m retroformer.serving wait --url "$URL" --timeout "$READY_TIMEOUT" --pid "$CHILD" "${LOAD[@]}"
echo "ready: $URL models: ${NAMES[*]}"
wait "$CHILD"
