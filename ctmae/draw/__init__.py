"""Pictures without a plotting library: reconstruction previews, evaluate's and study's charts, a bitmap font."""
