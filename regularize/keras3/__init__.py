"""The Keras 3 engine adapter: load, check, rebuild, save and verify Keras 3 models.

What it owns: reading a model file safely (`io`, with the pre-load check's Keras 3 side in
`trust` and `archive`), the read-only graph facts the core walks (`graph`), the rebuild that
applies the core's decisions with the same layer objects (`rewrite`), keras-hub models kept
in their class (`hub`, checked on a probe batch by `hub_probe`), their preset folders
(`hub_preset`) and the config-only rewrite that copies the weights as bytes (`hub_edit`),
Keras Applications by name (`applications`) and the one-step fit check (`training`).

What it may import: `regularize.core`, keras (3) and its packages (keras-hub). Never
tf_keras, tensorflow-model-optimization or `regularize.keras2`: the Keras 2 engine runs in a
process of its own.
"""
