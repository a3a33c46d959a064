"""mmjax.fusion."""
