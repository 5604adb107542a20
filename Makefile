# resens: the front door. Every target installs into .venv first when needed.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
OUT     ?= runs
CONFIG  ?=
CKPT    ?=
MODEL   ?=
WEIGHTS ?=
DATA    ?=
RESUME  ?=
ARGS    ?=

.PHONY: install demo train-cifar train-cifar-sd train-imagenet lesion test test-fast lint bench clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,timm]'
	touch $(STAMP)

## The embedded demo: digits ResNet and plain network, trained on the CPU, then analysed.
demo: install
	WANDB_SILENT=true $(PY) -m resens.demo --out $(OUT)/demo $(ARGS)

## The paper's CIFAR-10 ResNet-110 (164 epochs). DATA=/path/to/cifar (default: data/, downloaded if absent).
train-cifar: install
	$(PY) -m resens.train configs/cifar10_resnet110.yaml out_dir=$(OUT) \
		$(if $(DATA),data.root=$(DATA),data.download=true) $(if $(RESUME),resume=$(RESUME)) $(ARGS)

train-cifar-sd: install
	$(PY) -m resens.train configs/cifar10_resnet110_sd.yaml out_dir=$(OUT) \
		$(if $(DATA),data.root=$(DATA),data.download=true) $(if $(RESUME),resume=$(RESUME)) $(ARGS)

## Pre-activation ResNet-200 on ImageNet. DATA=/path/to/imagenet (with train/ and val/).
train-imagenet: install
	@test -n "$(DATA)" || { echo "error: set DATA=/path/to/imagenet (a folder with train/ and val/)"; exit 2; }
	$(PY) -m resens.train configs/imagenet_resnet200.yaml out_dir=$(OUT) data.root=$(DATA) \
		$(if $(RESUME),resume=$(RESUME)) $(ARGS)

## Analyses of a saved checkpoint: make lesion CKPT=path [CONFIG=configs/x.yaml] [OUT=dir]
## or of a library model: make lesion MODEL=torchvision:resnet50 DATA=/path/to/imagenet
##   [WEIGHTS=file.pth|file.safetensors|random] [OUT=dir] (no WEIGHTS: the cached default weights)
lesion: install
	@test -n "$(CKPT)$(MODEL)" || { echo "error: set CKPT=path/to/checkpoint.ckpt or MODEL=LIB:NAME DATA=folder"; exit 2; }
	$(PY) -m resens.analyze $(if $(MODEL),--model $(MODEL) --data "$(DATA)" $(if $(WEIGHTS),--weights $(WEIGHTS)),--checkpoint $(CKPT)) \
		$(if $(CONFIG),--config $(CONFIG)) $(if $(filter-out runs,$(OUT)),--out $(OUT)) $(ARGS)

## Each fast path against its naive reference, side by side: ratios in OUT/bench/bench.json.
bench: install
	$(PY) -m resens.bench --out $(OUT)/bench $(ARGS)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check resens callbacks tests

clean:
	rm -rf runs .pytest_cache .ruff_cache

## SLURM: render configs/slurm/<experiment>.sbatch (one task per GPU, requeue on SIGUSR1) and
## submit it; DRY_RUN=1 prints the script instead. Checks the config, the batch split and every
## path first. Options (unset: the template's line): GPUS=0 (a CPU job; TASKS tasks per node),
## CPUS (per task), MEM (per node) or MEM_PER_CPU, TIME, PARTITION, ACCOUNT, QOS, CONSTRAINT,
## SBATCH="--exclusive --signal=B:USR1@300" (more #SBATCH lines; one the template has replaces
## its line), CONFIG (default: configs/<template name>.yaml).
##   make slurm-cifar NODES=1 GPUS=4 [DATA=..] [ARGS="k=v ..."]
##   make slurm-imagenet NODES=4 GPUS=8 DATA=/path/to/imagenet [...]
##   make slurm-cifar GPUS=0 TASKS=2 CPUS=1 MEM=4G ARGS="..."
.PHONY: slurm-cifar slurm-imagenet
NODES   ?= 1
GPUS    ?= 1
SLURM_OPTS = --nodes $(NODES) --gpus $(GPUS) $(if $(DRY_RUN),--dry-run) \
	$(if $(TASKS),--tasks-per-node $(TASKS)) $(if $(CPUS),--cpus-per-task $(CPUS)) \
	$(if $(MEM),--mem $(MEM)) $(if $(MEM_PER_CPU),--mem-per-cpu $(MEM_PER_CPU)) \
	$(if $(TIME),--time $(TIME)) $(if $(PARTITION),--partition $(PARTITION)) \
	$(if $(ACCOUNT),--account $(ACCOUNT)) $(if $(QOS),--qos $(QOS)) \
	$(if $(CONSTRAINT),--constraint $(CONSTRAINT)) $(if $(SBATCH),--sbatch="$(SBATCH)") \
	$(if $(CONFIG),--config $(CONFIG))

slurm-cifar: install
	@$(PY) -m resens.slurm configs/slurm/cifar10_resnet110.sbatch $(SLURM_OPTS) -- out_dir=$(OUT) \
		$(if $(DATA),data.root=$(DATA)) $(if $(RESUME),resume=$(RESUME)) $(ARGS)

slurm-imagenet: install
	@test -n "$(DATA)" || { echo "error: set DATA=/path/to/imagenet (a folder with train/ and val/)"; exit 2; }
	@$(PY) -m resens.slurm configs/slurm/imagenet_resnet200.sbatch $(SLURM_OPTS) -- out_dir=$(OUT) \
		data.root=$(DATA) $(if $(RESUME),resume=$(RESUME)) $(ARGS)
