// pgjdbc as an application uses it: one connection from a JDBC URL, one query, its first
// column printed. Run from tests/sni.rs with `java -cp postgresql.jar Probe.java URL SQL`
// (Java's single-file launch, so nothing is compiled into the repository). A connection or
// query failure prints `ERROR <SQLSTATE> <message>` and exits 1, so the test can assert on
// what pgjdbc reported.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;

public class Probe {
    public static void main(String[] args) {
        try (Connection c = DriverManager.getConnection(args[0]);
             ResultSet r = c.createStatement().executeQuery(args[1])) {
            r.next();
            System.out.println(r.getString(1));
        } catch (SQLException e) {
            System.out.println("ERROR " + e.getSQLState() + " " + e.getMessage());
            System.exit(1);
        }
    }
}
