"""The loss engine: tensor code with no TRL in it, one module per rule.

separators -> parsing -> similarity, logprobs -> matching -> loss, reduction -> scoring -> answer_order; `reference`
holds the plain per-row loops the vectorized code is tested against, and `options` the names of the options.
Nothing is imported here, so that `trl_qaloss.engine.options` loads alone.
"""
