# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On the project's CPU machines this pin is a CPU build on local disk; elsewhere the normal PyPI build.
TORCH_PIN ?= torch==2.13.0
SOURCES := $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/ops/*/*.cpp csrc/ops/*/*.cu csrc/ops/*/*.cuh)

.PHONY: install demo test test-slow mutate bench bench-gpu clean tokenizer

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q numpy ninja "setuptools>=64" wheel "triton; platform_system == 'Linux'"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev,train]"
	$(BIN)/python -c "import vqdna, vqdna._ext as e; assert e.extension_available(), 'vqdna._C failed to build'"
	touch $@

demo: install
	$(BIN)/vqdna demo

# CPU CI: every Triton kernel runs under the interpreter; heavier checks are behind -m slow.
test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow" tests

test-slow: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow tests

# Mutation testing (tests/mutations.toml): every planted bug must make its tests fail; prints the kill
# rate and the survivors, fails below 90%. MUTATE_ARGS="--only ID ..." runs some of them.
mutate: install
	$(BIN)/python tools/mutate.py $(MUTATE_ARGS)

# CPU microbenchmarks; the ratio table (with device, versions, commit, command) goes to bench/results/.
# BENCH_SIZE=tiny|small|full picks the case grid (vqdna/bench/cases.py).
BENCH_SIZE ?= small
bench: install
	$(BIN)/python -m pytest bench -q -m "not cuda" --vqdna-size $(BENCH_SIZE) --benchmark-columns=min,median,rounds \
		--vqdna-results=bench/results/cpu-$$(date -u +%Y%m%d).json

# On a GPU machine, in one call: build the CUDA ops for its architecture, smoke-check every CUDA and
# Triton path, compute-sanitizer, the CUDA tests, the timed targets, then the suite while time is left
# (bench/gpu.sh --help). Results under $$OUT when set (at most 8 files), else bench/results/gpu-run-<time>.
# GPU_ARGS: e.g. --budget 300, --device cpu (a check of the script), --dry-run. Uses PYTHON (default: .venv's, else python3).
bench-gpu:
	PYTHON=$${PYTHON:-$$(test -x $(BIN)/python && echo $(BIN)/python || echo python3)} bench/gpu.sh $(GPU_ARGS)

# The bundled vqdna-small tokenizer (vqdna/assets/vqdna-small/TRAINING.md): trained on one strain per
# species, reported on the held-out strains. About 40 min on a 2-core CPU. GENOMES: the folder holding
# those genomes (sources and checksums: docs/data.md; examples/fetch_genomes.sh data fetches them into
# data/genomes), e.g. make tokenizer GENOMES=data/genomes.
TOKENIZER_OUT ?= build/tokenizer/vqdna-small
tokenizer: install
	@test -n "$(GENOMES)" || { echo "make tokenizer: set GENOMES=<folder with the training genomes>" >&2; exit 2; }
	OMP_NUM_THREADS=1 $(BIN)/vqdna train-tokenizer --config vqdna-small --steps 1000 --batch-size 32 \
		--warmup-steps 100 --seed 0 --threads 1 --save-every 200 --log-every 20 --out $(TOKENIZER_OUT) \
		--genomes $(GENOMES)/ecoli_MG1655.fasta.gz $(GENOMES)/hpylori_G27.fasta.gz $(GENOMES)/saureus_COL.fasta.gz \
		$(GENOMES)/kpneumoniae_HS11286.fna.xz $(GENOMES)/vcholerae_O395.fasta.gz $(GENOMES)/yeast_someORF.fa \
		$(GENOMES)/human_chr17_hg19_part.fa $(GENOMES)/virus_lambda.fa.gz $(GENOMES)/virus_dwv.fasta.gz \
		--holdout $(GENOMES)/hpylori_SJM180.fasta.gz $(GENOMES)/saureus_N315.fasta.gz
	install -m 644 $(TOKENIZER_OUT)/config.json $(TOKENIZER_OUT)/model.safetensors vqdna/assets/vqdna-small/

clean:
	rm -rf build *.egg-info vqdna/_C*.so $(VENV)
