"""Pictures of proposals: overlays, the HTML report, the figures' matplotlib set-up. Imports inference and below."""
