"""`xdctr finetune --new-domain`: DACDR's deployment feature (paper sec. 3.5).

A trained DACDR learns a new domain without retraining: the model is rebuilt with the new domain
appended to its domain list and its weights copied (`models.dacdr.expand_domains`), then only the
new domain's feature embedding and tokens, the target item embeddings and the cross-attention
projections train (`models.dacdr.finetune_variables`), on the new domain's rows; everything else
stays frozen. The result is exported like any trained model (both signatures, config, weights).
"""

from __future__ import annotations

import logging
import os

import keras
import tensorflow as tf

import models
from components.ingest import beam_pipeline
from components.trainer import export, preprocess, task
from models import config as config_lib
from models import dacdr
from xdctr import features as F

logger = logging.getLogger(__name__)


def finetune_new_domain(model_dir: str, new_domain: str, examples_dir: str, output_dir: str, steps: int,
                        batch_size: int = 256, learning_rate: float = 1e-3, seed: int = 0):
    """Fine-tunes the DACDR exported in `model_dir` on `new_domain`; returns (old model, new model).

    `examples_dir` is an ingestion output whose domain list is the model's domains followed by
    `new_domain` (run `xdctr ingest --domains old1,old2,new`).
    """
    keras.utils.set_random_seed(seed)
    name, old_config, old_model = task.load_trained_model(model_dir)
    if not isinstance(old_model, dacdr.DACDR):
        raise ValueError(f"fine-tuning a new domain is DACDR's feature (sec. 3.5); {model_dir} holds a `{name}` model")
    contract = beam_pipeline.read_contract(examples_dir)
    expected = tuple(old_config.inputs.domains) + (new_domain,)
    if contract.domains != expected:
        raise ValueError(f"{examples_dir} has domains {list(contract.domains)}; fine-tuning needs exactly {list(expected)} "
                         f"(ingest with --domains {','.join(expected)})")
    if old_config.inputs.item_vocabulary:
        logger.warning("%s was trained with an item vocabulary of %d ids; the new domain's items are not in it and "
                       "share its %d rows for other ids (train the base model with item_buckets=auto to hash them "
                       "apart)", model_dir, len(old_config.inputs.item_vocabulary),
                       old_config.inputs.item_buckets - 1 - len(old_config.inputs.item_vocabulary))
    overrides = config_lib.to_dict(old_config)
    new_config = task.resolve_model_config(name, overrides, contract)
    model = dacdr.expand_domains(old_model, new_config)
    trainable = dacdr.finetune_variables(model, len(expected) - 1)
    logger.info("fine-tuning %d of %d variables for new domain %s", len(trainable), len(model.weights), new_domain)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={F.SERVING_OUTPUT: keras.losses.BinaryCrossentropy()}, jit_compile=False)
    train_files = sorted(tf.io.gfile.glob(os.path.join(examples_dir, f"Split-{F.TRAIN_SPLIT}", "*.gz")))
    data = preprocess.dataset(train_files, new_config.inputs, batch_size, shuffle=True, repeat=True, seed=seed,
                              only_domain=new_domain).map(lambda x, y: (x, {F.SERVING_OUTPUT: y}))
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=2)
    export.export(model, new_config.inputs, output_dir)
    config_lib.save(new_config, name, output_dir)
    task.save_keras_weights(model, output_dir)
    return old_model, model
