from dashboard.views import knowledge

knowledge.render()
