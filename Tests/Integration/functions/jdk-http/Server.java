// A JDK HTTP server on 127.0.0.1:$APUS_PORT (runtime: command). GET / answers JSON about the JVM it runs in;
// GET /alloc?mb=N allocates and touches N MiB on the heap first. SIGTERM stops it (shutdown hook).
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.Executors;

public class Server {
    public static void main(String[] args) throws IOException {
        int port = Integer.parseInt(System.getenv("APUS_PORT"));
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 64);
        server.createContext("/", Server::handle);
        server.setExecutor(Executors.newFixedThreadPool(8));
        server.start();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> server.stop(0)));
        System.out.println("jdk-http listening on " + port + " (java " + System.getProperty("java.version") + ")");
    }

    static void handle(HttpExchange exchange) throws IOException {
        long allocated = 0;
        String query = exchange.getRequestURI().getQuery();
        if (exchange.getRequestURI().getPath().equals("/alloc") && query != null && query.startsWith("mb=")) {
            int mb = Math.min(Integer.parseInt(query.substring(3)), 128);
            byte[][] blocks = new byte[mb][];
            for (int i = 0; i < mb; i++) {
                blocks[i] = new byte[1 << 20];
                for (int j = 0; j < blocks[i].length; j += 4096) {
                    blocks[i][j] = 1;
                }
                allocated += blocks[i].length;
            }
        }
        Runtime rt = Runtime.getRuntime();
        String body = "{\"runtime\":\"java\",\"javaVersion\":\"" + System.getProperty("java.version") + "\""
            + ",\"path\":\"" + exchange.getRequestURI().getPath().replace("\"", "") + "\""
            + ",\"method\":\"" + exchange.getRequestMethod() + "\""
            + ",\"instance\":\"" + System.getenv("APUS_INSTANCE") + "\""
            + ",\"maxHeap\":" + rt.maxMemory()
            + ",\"processors\":" + rt.availableProcessors()
            + ",\"allocated\":" + allocated + "}";
        byte[] out = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "application/json");
        exchange.sendResponseHeaders(200, out.length);
        try (OutputStream os = exchange.getResponseBody()) {
            os.write(out);
        }
    }
}
