// Swagger UI served from our own static files (no CDN, no inline script: the CSP forbids both).
// deepLinking is off: it puts a link inside each operation's toggle button (nested interactive
// controls, which screen readers and keyboards cannot use).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: false });
});
