# Two commands matter: `make demo` (offline end-to-end run) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo app predict mlflow-ui mlflow-server exp-show browser test test-fast bench dag clean-venv

install: $(STAMP)

# Reinstall only when requirements or packaging change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/python -m braintumor.demo

# The web app on http://127.0.0.1:7860 (params.yaml's app section; flags: --model --host --port).
app: install
	$(BIN)/python -m braintumor.serve.app

# The app's model over files and folders, into a CSV: make predict ARGS="data/some/folder --out predictions.csv"
# (flags: --model --gradcam-dir --workers; see README, "Batch prediction").
predict: install
	$(BIN)/python -m braintumor.predict $(ARGS)

# The MLflow UI on http://127.0.0.1:5000 over the project's store (params.yaml's mlflow.tracking_uri).
MLFLOW_PORT ?= 5000
mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri "$$($(BIN)/python -m braintumor.core.tracking)" --host 127.0.0.1 --port $(MLFLOW_PORT)

# A shared MLflow tracking server on http://127.0.0.1:5000: runs in a SQLite database, artifacts in a
# local folder that the server serves (clients need no access to its disk). Point the pipeline and the
# app at it with `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000`. For a team: a PostgreSQL store
# (MLFLOW_SERVER_STORE=postgresql://user:pass@db/mlflow, needs psycopg2) and a host others can reach,
# behind an authenticating proxy (MLFLOW_HOST=0.0.0.0 is a deliberate choice, never the default).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
mlflow-server: install
	$(BIN)/mlflow server --backend-store-uri "$(MLFLOW_SERVER_STORE)" --artifacts-destination "$(MLFLOW_ARTIFACTS)" \
	  --serve-artifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

# DVC experiments side by side: the params that differ and both models' headline test metrics.
exp-show: install
	$(BIN)/dvc exp show --drop '.*' --keep '$(EXP_COLUMNS)' $(ARGS)

EXP_COLUMNS := ^Experiment$$|^Created$$|^(base|finetuned)\.(accuracy|macro_f1|ece_calibrated)$$|^(finetune|train_base)\.(learning_rate|epochs|unfreeze|batch_size)$$|^model\.backbone$$|^preprocess\.image_size$$

# Debian's chromium for the app's browser test (Playwright drives it; it never downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium is missing: sudo apt-get install chromium (the browser test skips without it)"; fi; }

# Two worker processes: most of the suite is single-threaded subprocess work (TensorFlow start-up, DVC,
# converters), so two cores run it in about half the time.
test: install browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The benchmarks behind BENCHMARKS.md (minutes; the shared datasets must be beside the repo).
bench: install
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_dedup.py
	$(BIN)/python benchmarks/dedup_recall.py
	$(BIN)/python benchmarks/bench_input_pipeline.py
	$(BIN)/python benchmarks/bench_gradcam.py
	$(BIN)/python benchmarks/bench_app.py
	$(BIN)/python benchmarks/bench_finetune_cache.py

dag: install
	$(BIN)/dvc dag

clean-venv:
	rm -rf $(VENV)
