"""mmjax.align."""
