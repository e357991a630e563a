"""The ReST pipeline: workdir, build, phases and the plan that runs them."""
