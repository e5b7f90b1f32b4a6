"""The application: the command line (`subnetdp plan`, `subnetdp demo`). It uses the engine;
the engine never imports it."""
