"""The gradient method: interaction maps from parameter gradients at feature-by-feature probes.

This method shares no code with the set-propagation method (:mod:`pipeline.maps.propagate`),
so that agreement between the two is evidence that both are right.

Method
------
1. Make a *probe copy* of the model (:mod:`~pipeline.maps.gradient.sanitise`): a deep copy
   in eval mode and float64, with every parameter element set to a positive value.
2. Run the copy under a function mode (:mod:`~pipeline.maps.gradient.mode`) that tracks
   which tensors are *activations* (computed from a feature input). The mode replaces a
   set of ops by *surrogates* (:mod:`~pipeline.maps.gradient.table`). A surrogate has the
   same dependence structure as its op, but keeps every activation non-negative, maps
   zero to zero and has no zero slopes.
3. Input map: for each input atom, feed the probe where only that atom is present
   (:mod:`~pipeline.maps.gradient.probes`) and take the gradient of the *objective*, the
   sum of every activation that the copy computes with a weight (every product of a
   parameter). A parameter element touches the atom iff its gradient is non-zero.
4. Output map: at the *present point* (every atom present), take the vector-Jacobian
   product of each output field. An element feeds the field iff its entry is non-zero.

``torch.func`` vectorises steps 3 and 4 (``vmap`` of ``grad`` over probes, ``vmap`` of
the ``vjp`` function over fields), in chunks of ``chunk_size``. :func:`loop_gradient_map`
computes the same map with one backward pass per probe and per field. Where ``vmap``
fails on a chunk (an op without a batching rule, an in-place write of a probe value into
a constant), that chunk is computed by the loop and a warning is logged. Memory grows
with ``chunk_size`` times the number of parameter elements (8 bytes each in float64).

Why a non-zero gradient means "touches"
---------------------------------------
In the probe copy every weight is positive and every input is 0 or 1. Every op on an
activation is either one of the surrogates below or an op with non-negative partial
derivatives: sums, means, products with weights, convolutions with zero padding,
indexing, gather, scatter, concatenation and reshapes. So every activation is
non-negative, and at the probe of atom ``a`` an activation is non-zero exactly when it
depends on ``a``. The
gradient of the objective with respect to a product of a weight is at least 1 (its own
term in the sum) plus non-negative terms. A weight element's gradient is the sum, over
every position where it is used, of its co-operand times that upstream gradient, so it
is non-zero exactly when some co-operand depends on ``a``. Nothing can cancel, and a
product that the model never uses downstream still counts, through its own term.

At the present point every activation that depends on any atom is positive, so the
entry of output field ``k`` for an element is non-zero exactly when the element's
product (for a bias, its sum) reaches ``k`` and its co-operand (for a bias, the element
it is added to) is non-zero. So an element whose co-operand is a structural zero feeds
nothing: a convolution tap that only meets padding, a weight column that reads a slot a
scatter never writes, an embedding row beyond the vocabulary.

Surrogates (applied only where an operand is an activation)
------------------------------------------------------------
- Unary nonlinearities (ReLU family, GELU, SiLU, tanh, sigmoid, exp, log, sqrt, abs, neg,
  clamp, ...) and dropout are the identity.
- Sums: two activations add (``x - y`` is ``x + y``). A *weight* (a constant that requires
  grad: a parameter or a tensor computed from parameters) added to an activation ``z`` is
  applied as a gain, ``z + b * z``. This is how biases are handled: the gradient of a bias
  element is then its co-operand ``z`` times the upstream gradient, so the element
  records the set of the element it is added to. The same holds for the ``bias``
  argument of ``linear``, ``conv*d``, ``layer_norm``, ``group_norm``, ``batch_norm``,
  ``addmm``/``baddbmm`` and for a parameter added with ``+`` (position embeddings). A
  plain constant (a buffer, an auxiliary input, a literal) added to an activation is
  dropped, so it cannot make the activation non-zero at the all-absent probe.
- Products (``*``, ``/``, ``matmul``, ``bmm``, ``einsum``, ``linear``): the sum over the
  activation operands of the product with every other activation and plain constant
  replaced by ones. A weight therefore multiplies exactly the co-operands it meets in
  the model, and the product of two activations (attention scores, gating) is non-zero
  wherever either factor is.
- Max, min, amax, amin, logsumexp, max pooling and ``max`` bags become sums over the same
  elements or windows; softmax becomes ``x + mean(x)`` along its axis; layer, group,
  instance and RMS normalisation become ``x + mean(x)`` over the normalised axes (batch
  normalisation in eval mode is elementwise), then the affine weight and bias.
- Embedding lookups (``F.embedding``, ``F.embedding_bag``, ``table[index]``) with an index
  computed from a categorical input become a product of a multi-hot matrix with the
  table (see :mod:`~pipeline.maps.gradient.embedding`); row ``c`` records ``{V:c}``, and
  rows at or beyond ``len(V)`` are never selected, so they record nothing.
- LSTM, GRU and RNN run over the input sequence repeated three times, which reaches the
  fixed point of the hidden state's set for the input map and for the output map (see
  :mod:`~pipeline.maps.gradient.recurrent`).
- Scaled dot-product attention and ``nn.MultiheadAttention`` are rebuilt from the rules
  above, honouring attention masks (see :mod:`~pipeline.maps.gradient.attention`).

Assumptions under which the gradient map equals the set map
-----------------------------------------------------------
- Every op that the model applies to an activation either has non-negative partial
  derivatives and maps 0 to 0 on non-negative inputs, or is in the surrogate table. An
  op outside both classes can hide an interaction (a sign change that cancels) or invent
  one (a non-zero value at the all-absent probe). The method checks both: it logs a
  warning naming the ops after which an activation went negative at the present point,
  and, where a parameter has a non-zero gradient at the all-absent probe, it logs a
  warning and compares each probe with that one instead of with zero. A non-finite
  gradient raises :class:`GradientMapError`.
- Categorical inputs reach their tables through ``F.embedding``, ``F.embedding_bag`` (2-D
  bags) or ``table[index]``, with the index unchanged on the way (no offsets added).
- Index tensors of ``gather``, ``scatter`` and indexing are constants whose values both
  methods read; the gradient method uses their real values.
- An atom is present on every entity of its input at once, so a max pooling's argmax is
  never needed: it is a sum in the probe copy.

Known differences from the set method
-------------------------------------
- A plain constant that multiplies an activation counts as all ones: a zero in a fixed
  mask buffer does not remove the dependence (the set method does not read values
  either). An attention mask, by contrast, is honoured, because it is an argument of the
  attention op.
- A layer or group normalisation over a single element, a softmax over a single element
  and ``x - x`` depend on their input in the set method; the surrogates keep that
  dependence, but the real model's output there is a constant.
- A parameter that is combined with another parameter before meeting an activation
  (``x @ (U @ V)``) records the activations it meets through the product; how the set
  method attributes such a product to ``U`` and ``V`` decides whether the maps agree.
- Recurrent cells called step by step (``nn.LSTMCell``) are not iterated to a fixed
  point; packed sequences raise :class:`GradientMapError`.
- A weight that multiplies a non-zero constant (an auxiliary input, a constant buffer)
  has an empty input set but feeds the outputs its product reaches, because its
  gradient there is non-zero.
"""

from pipeline.maps.gradient.compute import gradient_map, loop_gradient_map
from pipeline.maps.gradient.errors import GradientMapError

__all__ = ["gradient_map", "loop_gradient_map", "GradientMapError"]
