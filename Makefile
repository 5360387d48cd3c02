# histo: set-up is `make demo` and `make test`. Both install into .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
	libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 chromium

.PHONY: install sysdeps demo test lint bench train evaluate screenshot clean

install: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[napari,dev]"
	touch $(STAMP)

# Xvfb and GL libraries for the napari tests, Chromium for the report test (Debian);
# installed only when missing.
sysdeps:
	@if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libEGL.so.1 \
		|| ! ldconfig -p | grep -q libxkbcommon-x11 || ! command -v chromium >/dev/null 2>&1; then \
		echo "installing Xvfb, GL libraries and Chromium (report.html test)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(APT_PACKAGES); \
	fi

demo: install
	mkdir -p demo
	$(BIN)/histo synth --phenotype oc-rich --size 2048 --pixel-size 1.0 --seed 7 --out demo/oc-rich.ome.tif
	$(BIN)/histo analyze demo/oc-rich.ome.tif --out demo/results
	@echo "demo: see demo/results/indices.csv, demo/results/report.html and demo/results/*/overlay.png"

test: install sysdeps
	$(BIN)/lint-imports
	$(BIN)/ruff check histo plugins tests benchmarks
	QT_API=pyqt6 xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check histo plugins tests benchmarks
	$(BIN)/ruff format --check histo plugins tests benchmarks
	$(BIN)/lint-imports

bench: install
	$(BIN)/python -m benchmarks.run

# The shipped weights: five stages (histo/models/README.md), about 2 h on 2 cores.
train: install
	$(BIN)/histo train --out runs/histo-unet --seed 0 --time-limit 58
	$(BIN)/histo train --out runs/histo-unet-ft --seed 1 \
		--init runs/histo-unet/model.safetensors --lr 1e-3 --steps 500
	$(BIN)/histo train --out runs/histo-unet-ft2 --seed 2 \
		--init runs/histo-unet-ft/model.safetensors --lr 1e-3 --steps 1500
	$(BIN)/histo train --out runs/histo-unet-ft3 --seed 3 \
		--init runs/histo-unet-ft2/model.safetensors --lr 1e-3 --steps 1500 \
		--surface-crops 0.3 --class-weights 1 1 1 2 4
	$(BIN)/histo train --out runs/histo-unet-ft4 --seed 4 \
		--init runs/histo-unet-ft3/model.safetensors --lr 7e-4 --steps 1500 \
		--surface-crops 0.4 --class-weights 1 1 1 2 4
	$(BIN)/histo train --out runs/histo-unet-lb --seed 7 \
		--init runs/histo-unet-ft4/model.safetensors --lr 1e-3 --steps 1200 \
		--surface-crops 0.3 --class-weights 1 1 1 2 4 2 1 --long-bone-crops 0.5
	$(BIN)/histo train --out runs/histo-unet-lb2 --seed 8 \
		--init runs/histo-unet-lb/model.safetensors --lr 7e-4 --steps 1000 \
		--surface-crops 0.3 --class-weights 1 1 1 2 4 2 2 --long-bone-crops 0.5
	$(BIN)/histo train --out runs/histo-unet-lb3 --seed 9 \
		--init runs/histo-unet-lb2/model.safetensors --lr 5e-4 --steps 1000 \
		--surface-crops 0.4 --class-weights 1 1 1 2 4 2 2 --long-bone-crops 0.35
	$(BIN)/histo train --out runs/histo-unet-lb4 --seed 11 \
		--init runs/histo-unet-lb3/model.safetensors --lr 3e-4 --steps 800 \
		--surface-crops 0.5 --class-weights 1 1 1 2 4 2 2 --long-bone-crops 0.5
	cp runs/histo-unet-lb4/model.safetensors histo/models/histo-unet/model.safetensors
	$(BIN)/python -c "from histo.segment.registry import register_weights; \
		register_weights('unet', 'histo/models/histo-unet/model.safetensors')"
	$(BIN)/histo qc-reference --model default

evaluate: install
	$(BIN)/histo evaluate --out models/evaluation --cache runs/eval-cache

screenshot: install sysdeps
	QT_API=pyqt6 xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m histo_napari._screenshot docs/napari.png
	QT_API=pyqt6 xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m histo_napari._screenshot \
		docs/napari-finetune.png --train 5 --palette

clean:
	rm -rf $(VENV) demo bench-out
