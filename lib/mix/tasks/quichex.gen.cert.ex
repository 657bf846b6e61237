defmodule Mix.Tasks.Quichex.Gen.Cert do
  @shortdoc "Writes a self-signed certificate and key for development"

  @moduledoc """
  Writes a self-signed certificate and its private key for local
  development, like `mix phx.gen.cert`:

      $ mix quichex.gen.cert
      * creating priv/cert/selfsigned.pem
      * creating priv/cert/selfsigned_key.pem

  The certificate (ECDSA P-256) is valid for `localhost`, `127.0.0.1` and
  `::1` unless host names are given as arguments, in which case it is valid
  for those instead (the first one is also the common name):

      $ mix quichex.gen.cert myapp.test 192.168.1.10

  A server loads both files; a client trusts the certificate by loading it
  as its CA (`verify_peer` stays on):

      server = Quichex.Config.new(
        application_protos: ["echo"],
        load_cert_chain_from_pem_file: "priv/cert/selfsigned.pem",
        load_priv_key_from_pem_file: "priv/cert/selfsigned_key.pem"
      )

      client = Quichex.Config.new(
        application_protos: ["echo"],
        load_verify_locations_from_file: "priv/cert/selfsigned.pem"
      )

  The key file is readable by its owner only. Keep both files out of
  version control (`/priv/cert/` in `.gitignore`) and never use them in
  production. The same certificate can be made from code, without Mix,
  with `Quichex.DevCert.write!/1`.

  ## Options

    * `-o`, `--output PREFIX` - where to write: `PREFIX.pem` and
      `PREFIX_key.pem` (default `priv/cert/selfsigned`).
    * `--days N` - validity in days (default 365).
    * `--force` - overwrite existing files without asking.
  """

  use Mix.Task

  @switches [output: :string, days: :integer, force: :boolean]
  @aliases [o: :output]

  @impl Mix.Task
  def run(args) do
    {opts, hosts} =
      try do
        OptionParser.parse!(args, strict: @switches, aliases: @aliases)
      rescue
        error in OptionParser.ParseError -> Mix.raise(Exception.message(error))
      end

    output = Keyword.get(opts, :output, Quichex.DevCert.default_output())

    cert_opts =
      [days: Keyword.get(opts, :days, 365)] ++ if(hosts == [], do: [], else: [hosts: hosts])

    # Everything is checked before anything is asked or written.
    {paths, generated} =
      try do
        {Quichex.DevCert.paths(output), Quichex.DevCert.generate(cert_opts)}
      rescue
        error in ArgumentError -> Mix.raise(Exception.message(error))
      end

    existing = Enum.filter([paths.cert, paths.key], &File.exists?/1)

    if existing == [] or Keyword.get(opts, :force, false) or
         Mix.shell().yes?("#{Enum.join(existing, " and ")} already exist. Overwrite?") do
      _paths = Quichex.DevCert.store!(generated, paths)

      for path <- [paths.cert, paths.key] do
        Mix.shell().info([:green, "* creating ", :reset, Path.relative_to_cwd(path)])
      end

      Mix.shell().info("""

      A self-signed certificate for development only. Load it in your
      listener's config and trust it in your client's:

          load_cert_chain_from_pem_file: #{inspect(paths.cert)}
          load_priv_key_from_pem_file: #{inspect(paths.key)}
          load_verify_locations_from_file: #{inspect(paths.cert)}
      """)
    else
      Mix.shell().info("Nothing written.")
    end

    :ok
  end
end
