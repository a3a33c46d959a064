"""mmjax.train."""
