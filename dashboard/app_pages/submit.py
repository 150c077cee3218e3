from dashboard.views import submit

submit.render()
