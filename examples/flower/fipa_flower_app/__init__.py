"""fipa on a Flower deployment: the ServerApp and ClientApp of `fipa.flower`, configured by the run config."""
