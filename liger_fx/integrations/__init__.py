"""Hooks into other libraries. Each submodule is imported only on request; importing one installs its hook:

    import liger_fx.integrations.transformers    # TrainingArguments(use_liger_kernel=True) -> backend="liger"
"""
