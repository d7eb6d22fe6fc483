#!/usr/bin/env bash
# Training environments for the slow tests (idempotent; quiet; each step skipped when already done).
#
#   1. the service venv (.venv) gets the CPU training stack (the `train` extra, pinned as measured);
#   2. a second venv (.venv-unsloth, gitignored) gets Unsloth, whose pins (trl<=1.15, transformers<=5.17)
#      conflict with the CPU stack: the trainer runs there by absolute interpreter path, as in production;
#   3. the llama-cpp-python sdist is fetched once and only the files we use are extracted into a cache dir:
#      vocab-only GGUFs + real chat templates (tiny test models), converter + gguf-py (export);
#   4. xllamacpp (llama.cpp's engine, a prebuilt wheel) into both venvs: the export's engine check and the Ollama
#      stand-in's /api/chat load GGUFs with it.
#
# Env: CHATOS_RETRAIN_CACHE (default ~/.cache/chatos-retrain), SKIP_UNSLOTH=1 to skip step 2,
#      UNSLOTH_TORCH (default torch==2.13.0, the CPU wheel; name a CUDA build on a GPU machine).
# Measured on 2 shared cores (first run): step 1 ~60 s (~1.5 GB), step 2 ~135 s (~2.9 GB), step 3 ~50 s (77 MB
# download, 77 MB extracted), step 4 ~10 s (a 34 MB wheel per venv); afterwards the whole script is a 0.3 s check.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CHATOS_RETRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatos-retrain}"
LLAMA_VERSION="0.3.36"
XLLAMACPP_VERSION="2026.10.11549"
LLAMA_DIR="${CHATOS_RETRAIN_LLAMA_CPP_DIR:-$CACHE/llama.cpp-$LLAMA_VERSION}"
PY="${PYTHON:-python3}"

TORCH="torch==2.13.0"   # the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build
# gguf: transformers loads the vocab-only GGUFs with it (tiny test models); same version as the sdist's gguf-py.
CPU_STACK=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 gguf==0.19.0
           sentencepiece==0.2.3)
UNSLOTH_TORCH="${UNSLOTH_TORCH:-$TORCH}"
UNSLOTH_STACK=(unsloth==2026.10.9 unsloth_zoo==2026.10.9)

say() { printf '[train-setup] %s\n' "$*"; }
# pip warns once per package about this machine's extra file:// indexes; keep the rest of stderr.
pipq() { "$1" -m pip install --quiet --disable-pip-version-check "${@:2}" 2> >(grep -v "is ignored: it is neither" >&2); }

# 1. CPU training stack in the service venv. trl >= 1.16 is required: 1.15 cannot train on CPU.
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    say "creating $ROOT/.venv"
    "$PY" -m venv "$ROOT/.venv"
    pipq "$ROOT/.venv/bin/python" -e "$ROOT[dev]"
fi
if "$ROOT/.venv/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
want = {"torch": "2.13.0", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2",
        "accelerate": "1.15.0", "datasets": "5.2.0", "gguf": "0.19.0", "sentencepiece": "0.2.3"}
raise SystemExit(0 if all(m.version(k).split("+")[0] == v for k, v in want.items()) else 1)
EOF
then
    say "cpu stack present in .venv"
else
    say "installing the cpu training stack into .venv"
    start=$SECONDS
    pipq "$ROOT/.venv/bin/python" "$TORCH"
    pipq "$ROOT/.venv/bin/python" "${CPU_STACK[@]}"
    say "cpu stack installed in $((SECONDS - start)) s"
fi

# 2. Unsloth in its own venv. torchvision from PyPI fails to load beside the CPU torch and breaks `import unsloth`.
if [ "${SKIP_UNSLOTH:-0}" = "1" ]; then
    say "skipping unsloth venv (SKIP_UNSLOTH=1)"
elif [ -x "$ROOT/.venv-unsloth/bin/python" ] && "$ROOT/.venv-unsloth/bin/python" -c \
        "import importlib.metadata as m; raise SystemExit(m.version('unsloth') != '2026.10.9')" 2>/dev/null; then
    say "unsloth venv present"
else
    say "building .venv-unsloth"
    start=$SECONDS
    [ -x "$ROOT/.venv-unsloth/bin/python" ] || "$PY" -m venv "$ROOT/.venv-unsloth"
    pipq "$ROOT/.venv-unsloth/bin/python" "$UNSLOTH_TORCH"
    # torch named again: otherwise the resolver upgrades it to the newest CUDA build (+3 GB of nvidia wheels).
    pipq "$ROOT/.venv-unsloth/bin/python" "$UNSLOTH_TORCH" "${UNSLOTH_STACK[@]}"
    say "unsloth venv built in $((SECONDS - start)) s"
fi
if [ "${SKIP_UNSLOTH:-0}" != "1" ] && [ -d "$ROOT/.venv-unsloth" ] \
        && "$ROOT/.venv-unsloth/bin/python" -c "import importlib.util as u; raise SystemExit(not u.find_spec('torchvision'))"; then
    say "removing torchvision from .venv-unsloth (the PyPI build breaks \`import unsloth\` beside the CPU torch)"
    "$ROOT/.venv-unsloth/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y torchvision
fi

# 3. llama.cpp files from the llama-cpp-python sdist (never committed: third-party code lives in the cache).
#    The project's own `chatos-retrain setup export` does it: sha256-pinned, only the files we use extracted.
if [ -n "${CHATOS_RETRAIN_LLAMA_CPP_DIR:-}" ] && [ -f "$CHATOS_RETRAIN_LLAMA_CPP_DIR/convert_hf_to_gguf.py" ]; then
    say "llama.cpp files from CHATOS_RETRAIN_LLAMA_CPP_DIR=$CHATOS_RETRAIN_LLAMA_CPP_DIR"
else
    CHATOS_RETRAIN_CACHE="$CACHE" "$ROOT/.venv/bin/python" -m daemon setup export --cache-dir "$CACHE" \
        2> >(grep -v "is ignored: it is neither" >&2) | sed 's/^/[train-setup] /'
fi

# 4. llama.cpp's engine, xllamacpp (a prebuilt CPU wheel, ~34 MB, no compiler): the export child loads every GGUF
#    in it before Ollama does, and the Ollama stand-in's /api/chat runs the registered GGUF in it. Both venvs get it:
#    exports of Unsloth-trained adapters run in .venv-unsloth. A 0.1 s import check once installed.
for venv in "$ROOT/.venv" "$ROOT/.venv-unsloth"; do
    [ -x "$venv/bin/python" ] || continue
    if "$venv/bin/python" -c \
            "import importlib.metadata as m; raise SystemExit(m.version('xllamacpp') != '$XLLAMACPP_VERSION')" 2>/dev/null; then
        say "xllamacpp present in $(basename "$venv")"
    else
        say "installing xllamacpp $XLLAMACPP_VERSION into $(basename "$venv")"
        pipq "$venv/bin/python" "xllamacpp==$XLLAMACPP_VERSION"
    fi
done
