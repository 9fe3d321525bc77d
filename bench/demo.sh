#!/usr/bin/env bash
# The demo: set up .venv, build small Llama-shaped models (a base and six experts), ingest them into a
# store, export one back and check it byte for byte, merge three with TIES, then print what the store holds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export PYTHONPATH=$PWD MPSTORE_PATH=$PWD/demo/store
mp=.venv/bin/mpstore
rm -rf demo && mkdir demo
echo "== building models (bench.modelgen, preset small)"
.venv/bin/python -m bench.modelgen demo/models --preset small --lora 2 --partial 2 --full 2
echo "== ingesting"
$mp init
$mp ingest demo/models/base --name base
for expert in lora-0 lora-1 partial-0 partial-1 full-0 full-1; do
  $mp ingest "demo/models/$expert" --name "experts/$expert" --base auto
done
$mp ls
echo "== exporting experts/full-0 and comparing every file"
$mp export experts/full-0 demo/export/full-0
(cd demo/models/full-0 && sha256sum $(find . -type f | sort)) > demo/source.sha256
(cd demo/export/full-0 && sha256sum -c ../../source.sha256)
echo "== merging three experts with TIES (a mergekit YAML; the models are store refs)"
cat > demo/merge.yml <<'YAML'
merge_method: ties
base_model: base
models:
  - model: experts/lora-0
    parameters: {weight: 0.5, density: 0.5}
  - model: experts/partial-0
    parameters: {weight: 0.5, density: 0.5}
  - model: experts/full-0
    parameters: {weight: [0.3, 0.7], density: 0.5}
YAML
$mp merge demo/merge.yml --name merged/demo
$mp log merged/demo
$mp export merged/demo demo/export/merged
echo "== store statistics"
$mp du
$mp fsck
