"""InfoNCE with a bilinear sigmoid critic and in-batch negatives (SyNCRec's SC-MIM, eq. 14-17)."""

from __future__ import annotations

import keras
from keras import ops

from models.layers.masking import masked_softmax


@keras.saving.register_keras_serializable(package="xdctr")
class BilinearInfoNCE(keras.layers.Layer):
    """Per-anchor InfoNCE loss between two views, one group (e.g. domain) at a time (SyNCRec eq. 15-17).

    For group g, anchor i (view V, e.g. the cross-domain representation) and candidates j (view U,
    e.g. the single-domain representations of every row in the batch, the positive being j = i):

        rho(U_j, V_i) = sigmoid(U_j^T W V_i)                                     (eq. 17)
        loss[i, g] = -(rho(U_i, V_i) - log sum_j exp rho(U_j, V_i))              (eq. 15-16)

    i.e. the cross entropy of picking the row's own U among the batch's, the negative of the
    InfoNCE lower bound (up to log N). W is shared by the groups. Only rows with mask[., g] True
    take part, as anchors and as candidates; other anchors get a loss of 0. The sum over j
    includes the positive (eq. 15's form). The sigmoid bounds every critic value in (0, 1), as
    eq. 17 writes it, so the loss lies in [log(e + n - 1) - 1, log n] for n valid rows.

    Args:
      kernel_initializer: initializer of the (dim, dim) matrix W (W^H in eq. 17).

    Call args:
      candidates: (batch, groups, dim): U.
      anchors: (batch, groups, dim): V.
      mask: (batch, groups) bool: rows that have both views.
    Returns:
      (batch, groups) float32 per-anchor losses, 0 where mask is False.
    """

    def __init__(self, kernel_initializer="identity", **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = kernel_initializer

    def build(self, candidates_shape, anchors_shape=None, mask_shape=None):
        dim = int(candidates_shape[-1])
        self.kernel = self.add_weight(shape=(dim, dim), initializer=keras.initializers.get(self.kernel_initializer),
                                      name="kernel")

    def call(self, candidates, anchors, mask):
        candidates = ops.cast(candidates, "float32")
        anchors = ops.cast(anchors, "float32")
        mask = ops.cast(mask, "bool")
        projected = ops.einsum("rs,igs->igr", ops.cast(self.kernel, "float32"), anchors)  # (batch, groups, dim): W V_i
        critic = ops.sigmoid(ops.einsum("jgr,igr->igj", candidates, projected))  # (anchor i, groups, candidate j)
        candidate_mask = ops.expand_dims(ops.transpose(mask), 0)  # (1, groups, batch): j valid in group g
        probabilities = masked_softmax(critic, candidate_mask, axis=-1)  # (batch, groups, batch)
        batch = ops.shape(critic)[0]
        positive = ops.einsum("igj,ij->ig", probabilities, ops.eye(batch, dtype=probabilities.dtype))  # (batch, groups)
        safe = ops.where(mask, positive, ops.ones_like(positive))  # invalid anchors: log 1 = 0
        return -ops.log(safe) * ops.cast(mask, "float32")

    def compute_output_shape(self, candidates_shape, anchors_shape=None, mask_shape=None):
        return tuple(candidates_shape[:2])

    def get_config(self):
        config = super().get_config()
        config.update(kernel_initializer=self.kernel_initializer)
        return config
