"""Integrations with model frameworks, each imported only when asked for by name
(``import kvquant.integrations.transformers``)."""
