"""mmjax.models."""
