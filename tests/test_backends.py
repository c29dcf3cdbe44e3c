"""The models are backend-agnostic: every registered model trains one step under Keras's JAX backend.

Runs in a child process, since the Keras backend is fixed when Keras is first imported.
"""

import json
import os
import subprocess
import sys

import pytest

import models

pytestmark = pytest.mark.slow  # make test-fast skips these

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys
import keras, numpy as np
import models
from models.base import dummy_inputs
from xdctr import features as F

assert keras.backend.backend() == "jax", keras.backend.backend()
results = {}
for name in sys.argv[1:]:
    keras.utils.set_random_seed(0)
    config = models.resolve_config(name, {"inputs": {"domains": ["a", "b", "c"], "history_length": 4,
                                                     "domain_history_length": 3, "item_buckets": 64, "user_buckets": 64}})
    model = models.build(name, config)
    rng = np.random.default_rng(0)
    inputs = {k: keras.ops.convert_to_numpy(v) for k, v in dummy_inputs(config.inputs, batch=8).items()}
    for key in (F.USER_ID, F.ITEM_ID):
        inputs[key] = rng.integers(1, 64, size=8).astype("int32")
    inputs[F.DOMAIN] = rng.integers(0, 3, size=8).astype("int32")
    inputs[F.HISTORY_ITEM_IDS] = rng.integers(1, 64, size=(8, 4)).astype("int32")
    inputs[F.HISTORY_MASK] = np.ones((8, 4), bool)
    inputs[F.DOMAIN_HISTORY_ITEM_IDS] = rng.integers(1, 64, size=(8, 3, 3)).astype("int32")
    inputs[F.DOMAIN_HISTORY_MASK] = np.ones((8, 3, 3), bool)
    labels = {F.SERVING_OUTPUT: rng.integers(0, 2, size=8).astype("float32")}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})
    before = float(model.evaluate(inputs, labels, verbose=0))
    for _ in range(3):
        model.train_on_batch(inputs, labels)
    after = float(model.evaluate(inputs, labels, verbose=0))
    ctr = keras.ops.convert_to_numpy(model(inputs)[F.SERVING_OUTPUT])
    results[name] = {"before": before, "after": after, "finite": bool(np.all(np.isfinite(ctr))), "shape": list(ctr.shape)}
print(json.dumps(results))
"""


def test_every_model_trains_under_the_jax_backend():
    names = models.names()
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", CHILD, *names], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(results) == names
    for name, r in results.items():
        assert r["finite"] and r["shape"] == [8], (name, r)
        assert r["after"] < r["before"], (name, r)


SAMPLER_CHILD = r"""
import json
import keras, numpy as np
import models
from models.base import dummy_inputs
from xdctr import features as F

config = models.resolve_config("sasrec", {"inputs": {"domains": ["a", "b"], "history_length": 4,
                                                     "domain_history_length": 3, "item_buckets": 64, "user_buckets": 64}})
model = models.build("sasrec", config)
rng = np.random.default_rng(0)
x = {k: keras.ops.convert_to_numpy(v) for k, v in dummy_inputs(config.inputs, batch=8).items()}
x[F.ITEM_ID] = rng.integers(1, 64, size=8).astype("int32")
x[F.HISTORY_ITEM_IDS] = rng.integers(1, 64, size=(8, 4)).astype("int32")
x[F.HISTORY_MASK] = np.ones((8, 4), bool)
state_vars = [len(model.non_trainable_variables)]
model.set_ranking_objective([np.arange(1, 32), np.arange(32, 64)], 5, seed=3)
model.compile(optimizer="adam", loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()})
state = lambda: keras.ops.convert_to_numpy(model._ranking.seed_generator.state).tolist()  # noqa: E731
states = [state()]
for _ in range(3):
    model.train_on_batch(x, {F.SERVING_OUTPUT: np.ones(8, "float32")})
    states.append(state())
state_vars.append(len(model.non_trainable_variables))
weights = len(model.weights)
model.clear_ranking_objective()
state_vars.append(len(model.non_trainable_variables))
print(json.dumps({"states": states, "weights": [weights, len(model.weights)], "state_vars": state_vars}))
"""


def test_sampled_softmax_draws_new_negatives_every_step_under_the_jax_backend():
    """JAX's trainer steps are stateless over the model's tracked variables: the sampler's seed
    generator must be one of them, or every step draws the same negatives (it was not)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SAMPLER_CHILD], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    counters = [s[1] for s in out["states"]]
    assert counters == sorted(set(counters)) and len(counters) == 4, out  # advanced on every step
    assert out["weights"][0] == out["weights"][1], out  # the saved weights are the same with and without it
    before, during, after = out["state_vars"]
    assert during == before + 1 and after == before, out  # tracked while the objective is set, only then
