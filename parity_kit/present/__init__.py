"""Presentation: plot builders, widget panels, findings and HTML reports."""
