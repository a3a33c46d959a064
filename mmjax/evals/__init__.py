"""mmjax.evals."""
