"""Files: safe model loading, saving in deployment formats, calibration datasets, atomic writes."""
